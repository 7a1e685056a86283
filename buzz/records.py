"""On-disk records of a run: one JSON line per finished sample (appended and fsynced as it finishes), the resolved
config, and a summary. A run directory is named from its configuration, so re-running the same job finds it and
resumes at the first unfinished sample; a kill -9 loses at most the sample in flight."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "accelerate", "gguf", "hydra-core", "datasets", "rouge-score", "rouge", "wandb")


class RunRecords:
    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.samples_path = self.dir / "samples.jsonl"
        self.summary_path = self.dir / "summary.json"

    def samples(self) -> dict[str, dict]:
        """Finished samples by id. A torn last line (killed while writing) is ignored and later overwritten."""
        done: dict[str, dict] = {}
        if not self.samples_path.exists():
            return done
        with self.samples_path.open("rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                done[rec["id"]] = rec
        return done

    def append(self, record: dict) -> None:
        self._drop_torn_tail()
        with self.samples_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _drop_torn_tail(self) -> None:
        if not self.samples_path.exists():
            return
        data = self.samples_path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.samples_path.write_bytes(data[: data.rfind(b"\n") + 1])

    def write_json(self, name: str, obj: Any) -> None:
        write_json_atomic(self.dir / name, obj)

    def summary(self) -> dict | None:
        if not self.summary_path.exists():
            return None
        return json.loads(self.summary_path.read_text())


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _git_commit(root: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if done.returncode != 0 or not done.stdout.strip():
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()  # fmt: skip
        return done.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Package versions, git commit and hardware, for the summary."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env: dict[str, Any] = {"python": platform.python_version(), "packages": versions, "host": platform.node()}
    # KVBENCH_GIT_COMMIT says it explicitly: a copy of the checkout shipped to a GPU node may carry no .git, or a
    # stale one, whose HEAD is not the code that runs.
    env["git_commit"] = os.environ.get("KVBENCH_GIT_COMMIT") or _git_commit(Path(__file__).resolve().parents[1])
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
        env["cpu_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return env

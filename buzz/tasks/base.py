"""What every task provides to the runner: samples with a stable id, the data source they came from, prompt
encoding, and identical scoring for every cache policy."""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class Sample:
    id: str  # stable and unique within the task: runs resume by it
    text: str  # the document, question or (for perplexity) the stream's description
    reference: Any  # gold summary, gold answers, or None
    meta: dict = field(default_factory=dict)


@dataclass
class DataSource:
    origin: str  # "offline" or "hub"
    location: str  # file path, or hub id/config
    split: str
    synthetic: bool  # True when rows are synthetic: such results are never the real benchmark
    note: str

    def to_dict(self) -> dict:
        return asdict(self)


class Task:
    """Base class. Subclasses set `name`, `kind` ("generate" or "perplexity") and `defaults` (every config key
    with its default), and implement `load`, `encode` and the scoring methods."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "generate"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Mapping) -> None:
        unknown = set(cfg) - set(self.defaults)
        if unknown:
            key = sorted(unknown)[0]
            raise ValueError(f"task.{key} is not a key of task={self.name}; allowed: {', '.join(self.defaults)}")
        self.cfg = {**self.defaults, **dict(cfg)}
        if self.cfg["kind"] != self.kind:
            raise ValueError(f"task.kind={self.cfg['kind']} is invalid for task={self.name}; allowed: {self.kind}")
        self.skipped_empty = 0
        self.check()

    def check(self) -> None:
        """Validate values (one-line ValueError)."""

    def positive_int(self, key: str, optional: bool = False) -> int | None:
        value = self.cfg[key]
        if optional and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            allowed = "an int >= 1 or null" if optional else "an int >= 1"
            raise ValueError(f"task.{key}={value!r} is invalid; allowed: {allowed}")
        return value

    @property
    def max_new_tokens(self) -> int:
        return self.cfg["max_new_tokens"]

    @property
    def metric_info(self) -> dict[str, str]:
        return {}

    def load(self, data_dir: Path | None, limit: int | None) -> tuple[list[Sample], DataSource]:
        raise NotImplementedError

    def encode(self, sample: Sample, tokenizer) -> list[int]:
        raise NotImplementedError

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        raise NotImplementedError

    def record_fields(self, sample: Sample) -> dict[str, Any]:
        """Fields of the sample that its record carries beside the metrics (tables group by them)."""
        return {}

    def aggregate(self, per_sample: list[dict[str, float]]) -> dict[str, float]:
        keys = per_sample[0].keys() if per_sample else []
        out = {k: sum(m[k] for m in per_sample) / len(per_sample) for k in keys}
        return out | {"n": len(per_sample)}

    # helpers -----------------------------------------------------------------------------------------------
    def load_rows(self, data_dir: Path | None, offline_note: str) -> tuple[list[dict], DataSource]:
        """Rows from the Hub (data_dir None: `hub_path`, `hub_name`, `split`) or from `offline_file` under the
        offline data directory; a missing file is a one-line error."""
        c = self.cfg
        if data_dir is None:
            rows = load_hub_rows(c["hub_path"], c["hub_name"], c["split"])
            return rows, DataSource("hub", f"{c['hub_path']}:{c['hub_name']}:{c['split']}", c["split"], False, "")
        path = Path(data_dir) / c["offline_file"]
        if not path.exists():
            raise ValueError(f"task={self.name}: {path} not found; set data_dir to a folder laid out as ../shared/data")
        return read_jsonl(path), DataSource("offline", str(path), c["split"], False, offline_note)

    def chat_or_plain(self, content: str, tokenizer) -> list[int]:
        """Token ids of a user turn: the chat template (with the assistant prefix) when the task asks for it and
        the tokenizer has one, else the plain text with the tokenizer's own special tokens."""
        if self.cfg.get("use_chat_template") and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, Mapping):
                ids = ids["input_ids"]
            return list(ids)
        return list(tokenizer(content)["input_ids"])

    def truncate(self, text: str, tokenizer) -> str:
        """Cut a document to `max_prompt_tokens` tokens (the instruction around it stays whole)."""
        limit = self.cfg.get("max_prompt_tokens")
        if not limit:
            return text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= limit else tokenizer.decode(ids[:limit])


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_hub_rows(path: str, name: str | None, split: str) -> list[dict]:
    """Rows from the Hugging Face Hub (online users); the offline data directory is the default here."""
    from datasets import load_dataset

    return list(load_dataset(path, name, split=split))

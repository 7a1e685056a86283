"""Weights & Biases logging of a run: config, summary and a per-sample table. Never fatal: without wandb, or when
it fails, the run goes on with its local records."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LOGGER_NAMES = ("none", "wandb")
LOGGER_MODES = ("online", "offline", "disabled", "shared")


def _warn(msg: str) -> None:
    print(f"[kvbench] {msg}", file=sys.stderr)


def validate_logger_cfg(cfg: Mapping) -> None:
    """Cheap checks of a logger config; raises ValueError with one line naming the bad value."""
    if cfg.get("name") not in LOGGER_NAMES:
        raise ValueError(f"logger={cfg.get('name')} is unknown; allowed: {', '.join(LOGGER_NAMES)}")
    if cfg.get("mode", "offline") not in LOGGER_MODES:
        raise ValueError(f"logger.mode={cfg.get('mode')} is invalid; allowed: {', '.join(LOGGER_MODES)}")


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str)) or v is None


class RunLogger:
    def __init__(self, cfg: Mapping, run_name: str, config: dict, run_dir: Path) -> None:
        self.run = None
        self.rows: list[dict] = []
        mode = os.environ.get("WANDB_MODE") or cfg.get("mode", "offline")
        if cfg.get("name") == "none" or mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            _warn("wandb not installed: records stay local")
            return
        try:
            self.wandb = wandb
            self.run = wandb.init(
                project=cfg.get("project"), entity=cfg.get("entity"), name=run_name, config=config,
                dir=str(run_dir), mode=mode, tags=list(cfg.get("tags") or []), reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off"),
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - logging must never stop a run
            _warn(f"wandb init failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}): records stay local")
            self.run = None

    def log_sample(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        row = {k: v for k, v in record.items() if _scalar(v)}
        row |= {f"metric/{k}": v for k, v in record.get("metrics", {}).items() if _scalar(v)}  # no per-bucket lists
        self.rows.append(row)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
            flat |= {f"metric/{k}": v for k, v in summary.get("metrics", {}).items() if _scalar(v)}
            self.run.summary.update(flat)
            if self.rows:
                columns = sorted({k for r in self.rows for k in r})
                table = self.wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in self.rows])
                self.run.log({"samples": table})
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            _warn(f"wandb logging failed ({type(e).__name__}): records stay local")

"""Evaluation tasks. `build_task(cfg)` validates a task config and returns the task."""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from buzz.tasks.base import DataSource, Sample, Task
from buzz.tasks.passkey import Passkey
from buzz.tasks.qa10 import QA10
from buzz.tasks.summarization import CNNDailyMail, XSum
from buzz.tasks.wikitext import Wikitext, WikitextStream

TASKS: dict[str, type[Task]] = {t.name: t for t in (XSum, CNNDailyMail, Wikitext, WikitextStream, QA10, Passkey)}
TASK_NAMES = tuple(TASKS)


def build_task(cfg: Mapping) -> Task:
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    name = cfg.get("name")
    if name not in TASKS:
        raise ValueError(f"task={name} is unknown; allowed: {', '.join(TASK_NAMES)}")
    return TASKS[name](cfg)


__all__ = ["DataSource", "Sample", "Task", "TASKS", "TASK_NAMES", "build_task"]

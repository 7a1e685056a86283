"""Shared helpers for the harness tests: Hydra composition, small-job overrides, the offline data directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
DATA_DIR = REPO.parent / "shared" / "data"
TASKS = ("xsum", "cnn_dm", "qa10", "wikitext")

# Overrides that keep each task's job to a few seconds on tiny-llama (CPU).
SMALL = {
    "xsum": ["task.max_new_tokens=4", "task.max_prompt_tokens=96"],
    "cnn_dm": ["task.max_new_tokens=4", "task.max_prompt_tokens=96"],
    "qa10": ["task.max_new_tokens=4", "task.max_prompt_tokens=16"],
    "wikitext": ["task.stream_tokens=48", "task.prefix_tokens=16", "task.max_tokens=192"],
}

needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"offline data directory {DATA_DIR} is absent")


def compose_cfg(overrides: list[str]):
    """The composed job config for `overrides`, exactly as run.py would see it (without the hydra node)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def tiny_overrides(output_dir: Path, task: str = "xsum", *extra: str, limit: int = 2) -> list[str]:
    """A small offline tiny-llama job writing into `output_dir`."""
    return [
        "model=tiny-llama", "logger=none", f"task={task}", f"limit={limit}", "progress=false",
        f"output_dir={output_dir}", f"data_dir={DATA_DIR}", *SMALL[task], *extra,
    ]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: no progress bars, no W&B, the repo importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "KVBENCH_DATA_DIR")}
    path = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env |= {"CI": "1", "WANDB_MODE": "disabled", "PYTHONPATH": path}
    return env


PYTHON = sys.executable


@pytest.fixture(scope="module")
def model():
    """The tiny random GQA Llama that policies are checked on (tests/reference.py), one per test module."""
    from tests.reference import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model gains nothing from threads; on a busy machine they only spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Command-line front end: check every job of a (multi)run before anything loads, then hand over to Hydra."""

from __future__ import annotations

import itertools
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from buzz.runner import ConfigError, validate

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("model", "cache", "task", "logger", "experiment")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _split_sweep(value: str) -> list[str]:
    # Plain comma lists are expanded; anything fancier (ranges, choice(), quotes) is left to Hydra.
    if any(c in value for c in "()[]{}'\""):
        return [value]
    return value.split(",")


def preflight(overrides: list[str], multirun: bool = False) -> int:
    """Compose and validate every job the overrides describe. Returns the number of jobs; raises ConfigError."""
    parsed = []
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is invalid; allowed: key=value (e.g. cache=h2o cache.budget=0.2)")
        key, value = ov.split("=", 1)
        if key.lstrip("+~").startswith("hydra"):
            continue
        values = _split_sweep(value) if multirun else [value]
        base = key.lstrip("+~")
        if base in GROUPS:
            for v in values:
                if v not in group_options(base):
                    raise ConfigError(f"{base}={v} is unknown; allowed: {', '.join(group_options(base))}")
        parsed.append((key, values))
    combos = list(itertools.product(*[[f"{k}={v}" for v in vs] for k, vs in parsed]))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for combo in combos:
            cfg = _compose(list(combo))
            validate(cfg)
    return len(combos)


def _compose(overrides: list[str]):
    try:
        return compose(config_name="config", overrides=overrides)
    except Exception as e:  # Hydra's errors are several lines; find the bad key and say it in one.
        groups = [o for o in overrides if o.split("=", 1)[0] in GROUPS]
        base = compose(config_name="config", overrides=groups)
        for ov in overrides:
            key = ov.split("=", 1)[0]
            if key.startswith(("+", "~")) or key in GROUPS:
                continue
            head, _, rest = key.partition(".")
            if OmegaConf.select(base, key, default="__missing__") == "__missing__":
                if head in GROUPS and head in base:
                    allowed = ", ".join(str(k) for k in base[head].keys())
                    option = base[head].get("name")
                    raise ConfigError(f"{key} is not a key of {head}={option}; allowed: {allowed}") from None
                raise ConfigError(f"unknown key {key!r}; allowed: {', '.join(str(k) for k in base.keys())}") from None
        raise ConfigError(str(e).splitlines()[0]) from None

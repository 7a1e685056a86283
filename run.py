"""Run model x cache x task jobs: `python run.py cache=h2o cache.budget=0.2 task=xsum` (add -m to sweep)."""

import sys

import hydra
from omegaconf import DictConfig

from buzz.cli import preflight
from buzz.runner import ConfigError, run


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return summary.get("metrics", {}).get("rougeL")


if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a in ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help") or a.startswith("--cfg") for a in args):
        try:
            preflight([a for a in args if not a.startswith("-")], multirun=any(a in ("-m", "--multirun") for a in args))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    main()

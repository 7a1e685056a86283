"""Paper tables from run records: load every run under a records root, pair each policy with the full cache on the
same samples, and write markdown, CSV and PNG per table plus an index (results/README.md).

    python -m buzz.tables run summarization --model tiny-llama --limit 2 --policies window,h2o --budgets 0.5
    python -m buzz.tables render all                  # rebuild every table from stored records, runs nothing

Tables are defined in experiments/<name>.yaml (tasks, policies, budgets, reference policy, profiles). Relative
figures (ROUGE-L, QA accuracy and perplexity relative to the reference) come with a 95% paired bootstrap interval
over documents: documents are resampled with replacement, with the same indices for the policy and the reference,
and the statistic is a ratio of means (of exp(token-weighted mean NLL) for perplexity).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
CONFIGS = REPO / "configs"
TABLES = ("summarization", "qa", "ppl", "memory")
N_BOOT = 2000
SEED = 0
LEVEL = 0.95
# Task keys that never change what a table compares (they are listed separately or only name the data files).
TASK_KEYS_IGNORED = {"name", "kind", "gold_position"}
BUDGET_DEFINITION = {
    "generate": "a float budget is the fraction of each prompt's tokens the cache may store (an int: tokens)",
    "perplexity": "a float budget is the fraction of task.stream_tokens the cache may store (an int: tokens)",
}


# ------------------------------------------------------------------------------------------------ bootstrap


def paired_bootstrap(
    num_p: Sequence[float], num_r: Sequence[float], den_p: Sequence[float] | None = None,
    den_r: Sequence[float] | None = None, transform: Callable[[np.ndarray], np.ndarray] | None = None,
    n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL,
) -> tuple[float, float, float]:  # fmt: skip
    """Point estimate and percentile interval of  f(sum num_p / sum den_p) / f(sum num_r / sum den_r)  over documents
    (index i is the same document in every array). Without `den_*` that is a ratio of means; with token counts and
    f = exp it is a perplexity ratio. Each resample draws documents with replacement, the same for both sides."""
    num_p, num_r = np.asarray(num_p, float), np.asarray(num_r, float)
    n = len(num_p)
    if n == 0 or len(num_r) != n:
        raise ValueError(f"paired arrays must be non-empty and of equal length (got {n} and {len(num_r)})")
    den_p = np.ones(n) if den_p is None else np.asarray(den_p, float)
    den_r = np.ones(n) if den_r is None else np.asarray(den_r, float)
    f = transform or (lambda x: x)

    def stat(sums: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return f(sums(num_p) / sums(den_p)) / f(sums(num_r) / sums(den_r))

    point = float(stat(lambda a: a.sum(keepdims=True))[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 4_000_000 // n))
    out = []
    for start in range(0, n_boot, chunk):
        # Resample counts per document: row b says how often each document is drawn in resample b.
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, n_boot - start)).astype(float)
        out.append(stat(lambda a, w=w: w @ a))
    boots = np.concatenate(out)
    if not math.isfinite(point):
        return point, math.nan, math.nan
    boots = boots[np.isfinite(boots)]
    if len(boots) == 0:
        return point, math.nan, math.nan
    lo, hi = np.percentile(boots, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return point, float(lo), float(hi)


# ------------------------------------------------------------------------------------------------ records


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {} if path.exists() else {}


def _variant(params: dict, defaults: dict, ignored: set[str]) -> str:
    """`k=v,...` for the params that differ from the group's config file (empty when all are the defaults)."""
    diff = [
        f"{k}={v}" for k, v in sorted(params.items()) if k not in ignored and (k not in defaults or defaults[k] != v)
    ]
    return ",".join(diff)


def _label(name: str, variant: str) -> str:
    return f"{name}[{variant}]" if variant else name


def _read_samples(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    with path.open("rb") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:  # a torn last line of a killed run
                continue
    return list({r["id"]: r for r in rows}.values())


@dataclass
class Run:
    """One run directory: who it is (model, task, policy, budget) and its per-sample records."""

    dir: Path
    model: str
    task: str  # task label: name plus any non-default task settings, e.g. xsum[rouge=rouge_pkg]
    task_name: str
    task_kind: str
    gold_position: int | None
    policy: str  # policy label: cache name plus any non-default cache settings
    policy_name: str
    budget: float | int | None
    status: str
    summary: dict
    samples: list[dict]
    mtime: float

    @property
    def key(self) -> tuple:
        return (self.model, self.task, self.gold_position, self.policy, self.budget)


def load_runs(root: str | Path, configs: Path = CONFIGS) -> tuple[list[Run], list[str]]:
    """Every run under `root` (any depth; Hydra's own folders skipped) and warnings. Of several runs of the same
    model x task x policy x budget (e.g. one offline, one from the Hub) the one with most samples is kept."""
    root = Path(root)
    warn: list[str] = []
    runs: dict[tuple, Run] = {}
    if not root.is_dir():
        return [], [f"records root {root} does not exist"]
    seed_default = _yaml(configs / "config.yaml").get("seed", 0)
    for samples_path in sorted(root.rglob("samples.jsonl")):
        d = samples_path.parent
        if any(p.startswith(".") for p in d.relative_to(root).parts):
            continue
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        cfg = summary.get("config") or (
            json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else None
        )
        if not cfg:
            warn.append(f"{d}: no summary.json or config.json, skipped")
            continue
        task_cfg, cache_cfg = dict(cfg.get("task", {})), dict(cfg.get("cache", {}))
        task_name, policy_name = task_cfg.get("name"), cache_cfg.get("name")
        task_variant = _variant(task_cfg, _yaml(configs / "task" / f"{task_name}.yaml"), TASK_KEYS_IGNORED)
        if cfg.get("seed", seed_default) != seed_default:
            task_variant = ",".join(filter(None, [task_variant, f"seed={cfg.get('seed')}"]))
        policy_variant = _variant(cache_cfg, _yaml(configs / "cache" / f"{policy_name}.yaml"), {"name", "budget"})
        samples = _read_samples(samples_path)
        run = Run(
            dir=d, model=cfg.get("model", {}).get("name"), task=_label(task_name, task_variant), task_name=task_name,
            task_kind=task_cfg.get("kind", "generate"), gold_position=task_cfg.get("gold_position"),
            policy=_label(policy_name, policy_variant), policy_name=policy_name, budget=cache_cfg.get("budget"),
            status=summary.get("status", "incomplete (no summary.json)"), summary=summary, samples=samples,
            mtime=_finished_at(summary, samples_path),
        )  # fmt: skip
        if not samples:
            continue
        old = runs.get(run.key)
        if old is not None:
            keep, drop = (run, old) if (len(run.samples), run.mtime) > (len(old.samples), old.mtime) else (old, run)
            warn.append(f"two runs of {run.task} x {run.model} x {run.policy} budget {run.budget}: using {keep.dir} "
                        f"({len(keep.samples)} samples), not {drop.dir} ({len(drop.samples)})")  # fmt: skip
            run = keep
        runs[run.key] = run
    return list(runs.values()), warn


def sample_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per sample: run identity plus metrics and KV/latency fields."""
    rows = []
    for r in runs:
        for s in r.samples:
            row = {
                "model": r.model, "task": r.task, "gold_position": r.gold_position, "policy": r.policy,
                "policy_name": r.policy_name, "budget": r.budget, "id": str(s["id"]),
                "prompt_tokens": s.get("prompt_tokens"), "new_tokens": s.get("new_tokens"),
                "kv_mean": s.get("kv_tokens_mean"), "kv_peak": s.get("kv_tokens_peak"),
                "kv_bytes_peak": s.get("kv_bytes_peak"), "kv_bytes_full": s.get("kv_bytes_full"),
                "prefill_ms": s.get("prefill_ms"), "decode_ms": s.get("decode_ms_per_step"),
                "tokens_per_s": s.get("batch_tokens_per_s"),
            }  # fmt: skip
            row.update(s.get("metrics", {}))
            rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ specs


@dataclass
class Spec:
    name: str
    title: str
    builder: str
    tasks: list[dict]
    policies: list[str]
    budgets: list[float]
    reference: str
    profiles: dict[str, dict]
    jobs_from: str | None = None

    @classmethod
    def load(cls, name: str, directory: Path = EXPERIMENTS) -> Spec:
        path = directory / f"{name}.yaml"
        if not path.exists():
            allowed = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
            raise SystemExit(f"error: table {name!r} is unknown; allowed: {allowed}, all")
        d = _yaml(path)
        base = cls.load(d["jobs_from"], directory) if d.get("jobs_from") else None
        return cls(
            name=d["name"], title=d.get("title", d["name"]), builder=d.get("builder", d["name"]),
            tasks=d.get("tasks") or (base.tasks if base else []), policies=d.get("policies") or (base.policies if base
            else []), budgets=d.get("budgets") or (base.budgets if base else []),
            reference=d.get("reference") or (base.reference if base else "full"),
            profiles=d.get("profiles") or (base.profiles if base else {}), jobs_from=d.get("jobs_from"),
        )  # fmt: skip

    @property
    def task_names(self) -> list[str]:
        return list(dict.fromkeys(t["task"] for t in self.tasks))


def _fmt_budget(b: Any) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "-"
    return f"{b:g}" if isinstance(b, (int, float)) else str(b)


# ------------------------------------------------------------------------------------------------ running


def job_commands(
    spec: Spec, model: str, limit: Any, policies: Sequence[str], budgets: Sequence[float], runs_dir: str,
    device: str | None = None, logger: str = "none", extra: Sequence[str] = (), configs: Path = CONFIGS,
    python: str = sys.executable,
) -> tuple[list[list[str]], list[str]]:  # fmt: skip
    """Hydra multirun command lines for a table's jobs (per task entry: the budgeted policies x budgets, and the
    fixed-size ones with the reference), and messages about skipped policies."""
    msgs = []
    present = []
    for p in dict.fromkeys([spec.reference, *policies]):
        if (configs / "cache" / f"{p}.yaml").exists():
            present.append(p)
        else:
            msgs.append(f"skip policy {p}: configs/cache/{p}.yaml does not exist (yet)")
    budgeted = [p for p in present if _yaml(configs / "cache" / f"{p}.yaml").get("budget") is not None]
    fixed = [p for p in present if p not in budgeted]
    cmds = []
    for t in spec.tasks:
        task_limit = limit.get(t["task"]) if isinstance(limit, dict) else limit
        common = [f"model={model}", f"task={t['task']}"] + [f"{k}={v}" for k, v in t.items() if k != "task"]
        common += [
            f"limit={'null' if task_limit is None else task_limit}",
            f"logger={logger}",
            f"output_dir={runs_dir}",
        ]
        common += [f"device={device}"] if device else []
        common += list(extra)
        if budgeted and budgets:
            cmds.append([python, str(REPO / "run.py"), "-m", *common, f"cache={','.join(budgeted)}",
                         f"cache.budget={','.join(_fmt_budget(b) for b in budgets)}"])  # fmt: skip
        if fixed:
            cmds.append([python, str(REPO / "run.py"), "-m", *common, f"cache={','.join(fixed)}"])
    return cmds, msgs


# ------------------------------------------------------------------------------------------------ tables


@dataclass
class Table:
    name: str
    title: str
    frame: pd.DataFrame  # one row per task x (gold) x policy x budget
    markdown_columns: list[str]
    relative: str | None  # the column holding the relative figure (with _lo/_hi), if any
    metric_label: str
    warnings: list[str]
    meta: dict
    reference: str = "full"


def _series(df: pd.DataFrame, key: str) -> pd.Series:
    return df[key] if key in df else pd.Series(np.nan, index=df.index)


def _group_rows(df: pd.DataFrame, spec: Spec, reference: str, metrics: list[str], rel: dict | None, warn: list[str]):
    """Aggregate per task x gold x policy x budget; pair with the reference on common sample ids for `rel`
    ({"column", "num", "den", "transform"})."""
    rows = []
    df = df.assign(_gold=df["gold_position"].map(_fmt_budget), _budget=df["budget"].map(_fmt_budget))
    for (task, _), g in df.groupby(["task", "_gold"], dropna=False, sort=False):
        gold = g["gold_position"].iloc[0]
        gold = None if gold is None or (isinstance(gold, float) and math.isnan(gold)) else int(gold)
        where = f"{task}" + (f" (gold at {int(gold)})" if gold is not None else "")
        ref = g[g["policy"] == reference]
        if ref.empty and rel:
            warn.append(f"{where}: no {reference} run, so relative figures are missing (run the {reference} policy)")
        ref_by_id = ref.set_index("id")
        undefined: list[str] = []
        for (policy, _), p in g.groupby(["policy", "_budget"], dropna=False, sort=False):
            budget = p["budget"].iloc[0]
            row = {"task": task, "gold_position": gold, "policy": policy, "budget": budget, "n": len(p)}
            for m in metrics:
                row[m] = float(p[m].mean()) if m in p else math.nan
            row |= {
                "kv_mean": _series(p, "kv_mean").mean(), "kv_peak": _series(p, "kv_peak").mean(),
                "kv_peak_max": _series(p, "kv_peak").max(), "prompt_tokens": _series(p, "prompt_tokens").mean(),
                "kv_bytes_peak": _series(p, "kv_bytes_peak").mean(),
                "kv_bytes_full": _series(p, "kv_bytes_full").mean(),
                "prefill_ms": _series(p, "prefill_ms").mean(), "decode_ms": _series(p, "decode_ms").mean(),
                "tokens_per_s": _series(p, "tokens_per_s").mean(),
            }  # fmt: skip
            if rel:
                col = rel["column"]
                common = p[p["id"].isin(ref_by_id.index)].set_index("id")
                row["n_paired"] = len(common)
                if ref.empty or common.empty:
                    row[col] = row[f"{col}_lo"] = row[f"{col}_hi"] = math.nan
                    if not ref.empty:
                        warn.append(
                            f"{where}: {policy} budget {_fmt_budget(budget)} shares no sample id with {reference}"
                        )
                else:
                    r = ref_by_id.loc[common.index]
                    den = rel.get("den")
                    num_p, num_r = common[rel["num"]].to_numpy(float), r[rel["num"]].to_numpy(float)
                    den_p = None if den is None else common[den].to_numpy(float)
                    den_r = None if den is None else r[den].to_numpy(float)
                    point = paired_bootstrap(num_p, num_r, den_p, den_r, rel.get("transform"))
                    row[col], row[f"{col}_lo"], row[f"{col}_hi"] = point
                    if policy == reference:  # by definition, even where the reference's mean is 0
                        row[col] = row[f"{col}_lo"] = row[f"{col}_hi"] = 1.0
                    elif not math.isfinite(row[col]):
                        undefined.append(f"{policy} {_fmt_budget(budget)}")
                    if len(common) < len(p):
                        warn.append(
                            f"{where}: {policy} budget {_fmt_budget(budget)}: {len(p) - len(common)} of {len(p)} "
                            f"samples have no {reference} record; relative figure over {len(common)}"
                        )
            rows.append(row)
        if undefined:
            warn.append(f"{where}: {reference}'s mean {rel['num']} is 0 on the paired samples, so relative figures "
                        f"are undefined for: {', '.join(undefined)}")  # fmt: skip
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    order = {p: i for i, p in enumerate([reference, *spec.policies])}
    out["_o"] = out["policy"].map(lambda p: order.get(p.split("[")[0], len(order)))
    out["_b"] = pd.to_numeric(out["budget"], errors="coerce").fillna(-1)
    out = out.sort_values(["task", "gold_position", "_o", "policy", "_b"], na_position="first", kind="stable")
    return out.drop(columns=["_o", "_b"]).reset_index(drop=True)


def _exp(x: np.ndarray) -> np.ndarray:
    return np.exp(x)


def build_table(spec: Spec, runs: Sequence[Run], model: str | None = None, policies: Sequence[str] | None = None,
                budgets: Sequence[float] | None = None) -> Table:  # fmt: skip
    """Select the spec's runs (tasks, model; optional policy/budget filters) and aggregate them."""
    warn: list[str] = []
    task_names = set(spec.task_names)
    mine = [r for r in runs if r.task_name in task_names]
    golds = {t.get("task.gold_position") for t in spec.tasks} - {None}
    if golds:
        mine = [r for r in mine if r.gold_position in golds]
    models = sorted({r.model for r in mine})
    if model is None:
        wanted = spec.profiles.get("default", {}).get("model")
        if wanted in models or not models:
            model = wanted
        else:  # the model with most runs
            model = max(models, key=lambda m: sum(r.model == m for r in mine))
    mine = [r for r in mine if r.model == model]
    if policies:
        keep = set(policies) | {spec.reference}
        mine = [r for r in mine if r.policy_name in keep or r.policy in keep]
    if budgets:
        bset = {float(b) for b in budgets}
        mine = [r for r in mine if r.budget is None or float(r.budget) in bset]
    others = [m for m in models if m != model]
    if others:
        warn.append(f"records of other models not in this table: {', '.join(others)} (choose with --model / MODEL=)")
    for r in mine:
        if r.status != "done":
            warn.append(
                f"{r.task} x {r.policy} budget {_fmt_budget(r.budget)}: status {r.status} ({len(r.samples)} samples)"
            )
    synthetic = sorted({r.task for r in mine if (r.summary.get("data") or {}).get("synthetic")})
    if synthetic:
        warn.append(f"{', '.join(synthetic)}: SYNTHETIC data (see the data lines above): not the real benchmark")
    df = sample_frame(mine)
    ref = spec.reference
    b = spec.builder
    if b == "rouge":
        metrics = ["rouge1", "rouge2", "rougeL"]
        rel = {"column": "rel_rougeL", "num": "rougeL"}
        cols = ["task", "policy", "budget", "n", "rouge1", "rouge2", "rougeL", "rel_rougeL", "kv_mean", "kv_peak"]
        label = "ROUGE-L relative to full"
    elif b == "qa":
        metrics = ["accuracy"]
        rel = {"column": "rel_accuracy", "num": "accuracy"}
        cols = ["task", "gold_position", "policy", "budget", "n", "accuracy", "rel_accuracy", "kv_mean", "kv_peak"]
        label = "accuracy relative to full"
    elif b == "ppl":
        metrics = ["nll_sum", "n_tokens"]
        rel = {"column": "rel_ppl", "num": "nll_sum", "den": "n_tokens", "transform": _exp}
        cols = ["task", "policy", "budget", "n", "tokens", "ppl", "rel_ppl", "kv_mean", "kv_peak"]
        label = "perplexity relative to full (lower is better)"
    elif b == "memory":
        metrics = ["rougeL"]
        rel = {"column": "rel_rougeL", "num": "rougeL"}
        cols = ["task", "policy", "budget", "n", "kv_mean", "kv_peak", "kv_peak_max", "kv_bytes_peak", "kv_bytes_full",
                "kv_ratio", "prefill_ms", "decode_ms", "tokens_per_s", "rel_rougeL"]  # fmt: skip
        label = "ROUGE-L relative to full"
    else:
        raise ValueError(f"experiments/{spec.name}.yaml: builder={b} is unknown; allowed: rouge, qa, ppl, memory")
    frame = pd.DataFrame() if df.empty else _group_rows(df, spec, ref, metrics, rel, warn)
    if frame.empty:
        warn.append(f"no records for tasks {', '.join(sorted(task_names))}" + (f" and model {model}" if model else ""))
        frame = pd.DataFrame(columns=[*cols, "n_paired", f"{rel['column']}_lo", f"{rel['column']}_hi"])
    if b == "ppl" and not frame.empty:
        frame["tokens"] = frame["n_tokens"] * frame["n"]
        frame["ppl"] = np.exp(frame["nll_sum"] / frame["n_tokens"])
        frame = frame.drop(columns=["nll_sum", "n_tokens"])
    if "kv_bytes_peak" in frame:
        frame["kv_ratio"] = frame["kv_bytes_peak"] / frame["kv_bytes_full"]
    frame.insert(0, "model", model)
    meta = table_meta(spec, mine, model)
    return Table(spec.name, spec.title, frame, cols, rel["column"], label, list(dict.fromkeys(warn)), meta, ref)


def table_meta(spec: Spec, runs: Sequence[Run], model: str | None) -> dict:
    """What a reader needs to judge the table: model, data source (real or synthetic), split, sample counts,
    ROUGE implementation, budget definition, when and from which commit the records came."""
    data, rouge, commits, kinds = {}, set(), set(), set()
    for r in runs:
        d = r.summary.get("data") or {}
        key = d.get("location", "unknown (no summary.json)")
        data.setdefault(key, {"task": r.task, "origin": d.get("origin"), "split": d.get("split"),
                              "synthetic": d.get("synthetic"), "note": d.get("note")})  # fmt: skip
        info = r.summary.get("metric_info") or {}
        if "rouge" in info:
            rouge.add(f"{info['rouge']}: {info.get('rouge_description', '')}".strip(": "))
        commit = (r.summary.get("environment") or {}).get("git_commit")
        if commit:
            commits.add(commit)
        kinds.add(r.task_kind)
    times = [r.mtime for r in runs]
    counts = sorted({len(r.samples) for r in runs})
    return {
        "name": spec.name, "title": spec.title, "model": model, "runs": len(runs),
        "samples_per_run": counts, "data": data, "rouge": sorted(rouge),
        "budget_definition": [BUDGET_DEFINITION[k] for k in sorted(kinds) if k in BUDGET_DEFINITION],
        "records_from": _date(min(times)) if times else None, "records_to": _date(max(times)) if times else None,
        "record_commits": sorted(commits),
    }  # fmt: skip


def _finished_at(summary: dict, samples_path: Path) -> float:
    """When the run finished: its summary says so (records travel between machines and clones, which reset file
    times); older records fall back to the samples file's time."""
    stamp = (summary or {}).get("finished_at")
    if stamp:
        return dt.datetime.fromisoformat(stamp).timestamp()
    return samples_path.stat().st_mtime


def _date(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ writing


def _cell(v: Any, col: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if col == "budget":
        return _fmt_budget(v)
    if col in ("n", "n_paired", "tokens", "gold_position", "kv_peak_max"):
        return str(int(v))
    if col.startswith("kv_bytes"):
        return f"{v / 2**20:.2f} MiB" if v >= 2**20 else f"{v / 2**10:.1f} KiB"
    if isinstance(v, float):
        if col in ("kv_mean", "kv_peak", "prefill_ms", "decode_ms", "tokens_per_s", "ppl"):
            return f"{v:.1f}" if abs(v) < 1e5 else f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.4g}"
    return str(v)


HEADERS = {
    "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rel_rougeL": "ROUGE-L / full [95% CI]",
    "rel_accuracy": "acc / full [95% CI]", "rel_ppl": "ppl / full [95% CI]", "kv_mean": "KV tokens (mean)",
    "kv_peak": "KV tokens (peak, mean/sample)", "kv_peak_max": "KV peak (max)", "kv_bytes_peak": "KV bytes (peak)",
    "kv_bytes_full": "KV bytes (full)", "kv_ratio": "KV bytes / full", "prefill_ms": "prefill ms",
    "decode_ms": "decode ms/step", "tokens_per_s": "tok/s", "gold_position": "gold at",
}  # fmt: skip


def to_markdown(t: Table) -> str:
    m = t.meta
    lines = [f"# {t.title}", ""]
    counts = ", ".join(map(str, m["samples_per_run"])) or "-"
    lines += [f"- model: `{m['model']}`; {m['runs']} runs; samples per run: {counts}"]
    for loc, d in m["data"].items():
        kind = "SYNTHETIC" if d.get("synthetic") else "real" if d.get("synthetic") is False else "unknown"
        lines.append(f"- data ({d['task']}): {kind}, {d.get('origin')} `{loc}`, split {d.get('split')}")
    for r in m["rouge"]:
        lines.append(f"- ROUGE: {r}")
    for b in m["budget_definition"]:
        lines.append(f"- budget: {b}; `-` = no budget (full, or a fixed-size policy)")
    if t.relative:
        stat = "ratio of exp(token-weighted mean NLL)" if t.relative == "rel_ppl" else "ratio of means"
        lines.append(f"- {t.metric_label}: same samples paired by id; 95% paired bootstrap over documents "
                     f"({N_BOOT} resamples, seed {SEED}), {stat}")  # fmt: skip
    commits = ", ".join(m["record_commits"]) or "-"
    lines.append(f"- records {m['records_from']} .. {m['records_to']}, commit(s) {commits}")
    lines.append("")
    if t.warnings:
        lines += ["**Notes**", ""] + [f"- {w}" for w in t.warnings] + [""]
    if t.frame.empty:
        lines.append("_No records._")
        return "\n".join(lines) + "\n"
    cols = [c for c in t.markdown_columns if c != "task"]
    for task, g in t.frame.groupby("task", sort=False):
        lines += [f"## {task}", ""]
        lines.append("| " + " | ".join(HEADERS.get(c, c) for c in cols) + " |")
        lines.append("|" + "|".join("---" if c in ("policy",) else "---:" for c in cols) + "|")
        for _, row in g.iterrows():
            cells = []
            for c in cols:
                if c == t.relative:
                    v, lo, hi = row[c], row.get(f"{c}_lo"), row.get(f"{c}_hi")
                    cell = _cell(v, c)
                    if cell != "-" and lo is not None and not (isinstance(lo, float) and math.isnan(lo)):
                        cell += f" [{lo:.3f}, {hi:.3f}]"
                    cells.append(cell)
                else:
                    cells.append(_cell(row.get(c), c))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(t: Table, path: Path) -> None:
    """Quality relative to full vs KV budget (memory: vs measured KV bytes relative to full), one line per policy,
    full as a horizontal line, 95% bootstrap bands. Without a full run: the absolute metric, no bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = t.frame
    panels = list(f.groupby(["task", "gold_position"], dropna=False, sort=False)) if not f.empty else []
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.6), squeeze=False)
    absolute = {"rel_rougeL": "rougeL", "rel_accuracy": "accuracy", "rel_ppl": "ppl"}[t.relative]
    for ax, ((task, gold), g) in zip(axes[0], panels):
        is_ref = g["policy"] == t.reference
        has_ref = bool(is_ref.any()) and bool(np.isfinite(g.loc[~is_ref, t.relative].to_numpy(float)).any())
        ycol = t.relative if has_ref else absolute
        xcol = "kv_ratio" if t.name == "memory" else "budget"
        for policy, p in g[~is_ref].groupby("policy", sort=False):
            x = pd.to_numeric(p[xcol], errors="coerce")
            if x.isna().all():  # a fixed-size policy: place it at its measured stored fraction of the prompt
                x = p["kv_peak"] / p["prompt_tokens"]
            order = np.argsort(x.to_numpy())
            xs, ys = x.to_numpy()[order], p[ycol].to_numpy(float)[order]
            (line,) = ax.plot(xs, ys, marker="o", label=policy)
            if has_ref:
                lo, hi = p[f"{t.relative}_lo"].to_numpy(float)[order], p[f"{t.relative}_hi"].to_numpy(float)[order]
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        if is_ref.any():
            yref = 1.0 if has_ref else float(g.loc[is_ref, ycol].iloc[0])
            ax.axhline(yref, color="black", linestyle="--", linewidth=1, label=t.reference)
        title = str(task) + (
            "" if gold is None or (isinstance(gold, float) and math.isnan(gold)) else f", gold at {int(gold)}"
        )
        ax.set_title(title + ("" if has_ref else f" (absolute: no usable {t.reference} run)"), fontsize=10)
        ax.set_xlabel("KV bytes (peak) / full" if xcol == "kv_ratio" else "KV budget (fraction)")
        ax.set_ylabel(t.metric_label if has_ref else absolute, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no records", ha="center", va="center")
    fig.suptitle(f"{t.title} ({t.meta['model']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CSV_FIRST = ["model", "task", "gold_position", "policy", "budget", "n", "n_paired"]


def write_table(t: Table, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    f = t.frame
    if t.name != "qa" and "gold_position" in f:
        f = f.drop(columns=["gold_position"])
    cols = [c for c in CSV_FIRST if c in f] + [c for c in f.columns if c not in CSV_FIRST]
    paths = [out_dir / f"{t.name}.{ext}" for ext in ("md", "csv", "png", "json")]
    paths[0].write_text(to_markdown(t))
    f[cols].to_csv(paths[1], index=False, float_format="%.6g")
    plot(t, paths[2])
    paths[3].write_text(json.dumps(t.meta | {"warnings": t.warnings}, indent=2, default=str) + "\n")
    return paths


def write_index(out_dir: Path) -> Path:
    """results/README.md: every table present in out_dir with its metadata (from the <name>.json beside it)."""
    lines = [
        "# Results",
        "",
        "Tables rendered from run records by `make tables-render` (`python -m buzz.tables render all`).",
        "Each table has a markdown file, a CSV and a plot (quality vs KV budget, 95% paired bootstrap bands).",
        "",
    ]
    names = [n for n in TABLES if (out_dir / f"{n}.json").exists()]
    names += sorted(
        p.stem for p in out_dir.glob("*.json") if p.stem not in names and (out_dir / f"{p.stem}.md").exists()
    )
    if not names:
        lines.append("_No tables yet._")
    for n in names:
        m = json.loads((out_dir / f"{n}.json").read_text())
        lines += [f"## {m.get('title', n)}", "", f"[{n}.md]({n}.md) · [{n}.csv]({n}.csv) · [{n}.png]({n}.png)", ""]
        lines.append(f"- model: `{m.get('model')}`; runs: {m.get('runs')}; samples per run: "
                     f"{', '.join(map(str, m.get('samples_per_run', []))) or '-'}")  # fmt: skip
        for loc, d in (m.get("data") or {}).items():
            kind = "SYNTHETIC" if d.get("synthetic") else "real" if d.get("synthetic") is False else "unknown"
            lines.append(f"- data ({d.get('task')}): **{kind}**, {d.get('origin')} `{loc}`, split {d.get('split')}"
                         + (f" ({d['note']})" if d.get("note") else ""))  # fmt: skip
        for r in m.get("rouge") or []:
            lines.append(f"- ROUGE implementation: {r}")
        for b in m.get("budget_definition") or []:
            lines.append(f"- budget: {b}")
        lines.append(f"- records: {m.get('records_from')} .. {m.get('records_to')}, commit(s) "
                     f"{', '.join(m.get('record_commits') or []) or '-'}")  # fmt: skip
        if m.get("warnings"):
            lines.append(f"- notes: {len(m['warnings'])} (see {n}.md)")
        lines.append("")
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def render(names: Sequence[str], runs_dir: Path, out_dir: Path, model: str | None = None,
           policies: Sequence[str] | None = None, budgets: Sequence[float] | None = None,
           experiments: Path = EXPERIMENTS, configs: Path = CONFIGS) -> list[Table]:  # fmt: skip
    runs, warn = load_runs(runs_dir, configs)
    for w in warn:
        print(f"[tables] {w}", file=sys.stderr)
    tables = []
    for name in names:
        spec = Spec.load(name, experiments)
        t = build_table(spec, runs, model, policies, budgets)
        paths = write_table(t, out_dir)
        print(f"[tables] {name}: {len(t.frame)} rows ({t.meta['model']}) -> {', '.join(str(p) for p in paths[:3])}")
        for w in t.warnings:
            print(f"[tables]   note: {w}")
        tables.append(t)
    write_index(out_dir)
    return tables


def export(runs_dir: Path, to: Path) -> int:
    """Copy run records into a committed records folder, dropping what is the dataset's, not ours: each sample's
    `reference` (gold summaries and answers). Tables render from it byte-identically on any clone. Returns runs."""
    n = 0
    for samples_path in sorted(runs_dir.rglob("samples.jsonl")):
        src = samples_path.parent
        if ".hydra" in src.parts:
            continue
        dst = to / src.relative_to(runs_dir)
        dst.mkdir(parents=True, exist_ok=True)
        summary_path = src / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            summary.setdefault("finished_at", _date(samples_path.stat().st_mtime))
            (dst / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        if (src / "config.json").exists():
            shutil.copyfile(src / "config.json", dst / "config.json")
        rows = [{k: v for k, v in r.items() if k != "reference"} for r in _read_samples(samples_path)]
        (dst / "samples.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        n += 1
    return n


# ------------------------------------------------------------------------------------------------ CLI


def _list(value: str | None) -> list[str] | None:
    items = [v for v in (value or "").replace(" ", ",").split(",") if v]
    return items or None


def _names(values: Sequence[str]) -> list[str]:
    names = []
    for v in values:
        names += list(TABLES) if v == "all" else [v]
    return list(dict.fromkeys(names))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m buzz.tables", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("export", help="copy records (without dataset references) into a committed folder")
    p.add_argument("--runs-dir", default="results/runs")
    p.add_argument("--to", default="results/records")
    for cmd in ("run", "render"):
        p = sub.add_parser(cmd, help="run the jobs, then render" if cmd == "run" else "render from stored records only")
        p.add_argument("tables", nargs="+", help=f"table names ({', '.join(TABLES)}) or all")
        p.add_argument("--output", default="results", help="root: runs in <output>/runs, tables in <output>/")
        p.add_argument("--runs-dir", default=None, help="records root (default <output>/runs)")
        p.add_argument("--model", default=None, help="model config name (default: the profile's)")
        p.add_argument("--profile", default="default", help="default | paper (experiments/<table>.yaml profiles)")
        p.add_argument("--policies", default=None, help="comma list (run: default the table's; render: all found)")
        p.add_argument("--budgets", default=None, help="comma list (run: default the table's; render: all found)")
        if cmd == "run":
            p.add_argument("--limit", default=None, help="samples per job (default: the profile's); null = all")
            p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
            p.add_argument("--logger", default="none", help="none | wandb")
            p.add_argument("--extra", default="", help="more run.py overrides, space separated")
            p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = ap.parse_args(argv)
    if a.cmd == "export":
        n = export(Path(a.runs_dir), Path(a.to))
        print(f"[tables] exported {n} runs from {a.runs_dir} to {a.to}")
        return 0
    out_dir = Path(a.output)
    runs_dir = Path(a.runs_dir) if a.runs_dir else out_dir / "runs"
    names = _names(a.tables)
    policies, budgets = _list(a.policies), _list(a.budgets)
    budgets_f = [float(b) for b in budgets] if budgets else None
    status = 0
    if a.cmd == "run":
        seen = set()
        for name in names:
            spec = Spec.load(name)
            job_spec = Spec.load(spec.jobs_from) if spec.jobs_from else spec
            if job_spec.name in seen:
                continue
            seen.add(job_spec.name)
            profile = job_spec.profiles.get(a.profile)
            if profile is None:
                raise SystemExit(f"error: profile={a.profile} is unknown; allowed: {', '.join(job_spec.profiles)}")
            model = a.model or profile["model"]
            limit = (
                profile.get("limit") if a.limit is None else (None if a.limit in ("null", "none", "") else int(a.limit))
            )
            sel_p, sel_b = policies or job_spec.policies, budgets or job_spec.budgets
            cmds, msgs = job_commands(
                job_spec, model, limit, sel_p, sel_b, str(runs_dir), a.device, a.logger, shlex.split(a.extra)
            )
            for m in msgs:
                print(f"[tables] {job_spec.name}: {m}")
            for cmd in cmds:
                print("[tables] $ " + shlex.join(cmd[1:]), flush=True)
                if not a.dry_run:
                    rc = subprocess.run(cmd, cwd=REPO, env=os.environ | {"HYDRA_FULL_ERROR": "1"}).returncode
                    if rc:
                        print(
                            f"[tables] {job_spec.name}: a job failed (exit {rc}); rendering what exists",
                            file=sys.stderr,
                        )
                        status = rc
        if a.dry_run:
            return 0
    model = a.model
    if model is None:
        model = Spec.load(names[0]).profiles.get(a.profile, {}).get("model") if a.profile != "default" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        render(names, runs_dir, out_dir, model, policies, budgets_f)
    return status


if __name__ == "__main__":
    raise SystemExit(main())

"""Paper tables from run records: load every run under a records root, pair each policy with the full cache on the
same samples, and write markdown, CSV and PNG per table plus an index (results/README.md).

    python -m buzz.tables run summarization --model tiny-llama --limit 2 --policies window,h2o --budgets 0.5
    python -m buzz.tables render all                  # rebuild every table from stored records, runs nothing

Tables are defined in experiments/<name>.yaml (tasks, policies, budgets, reference policy, profiles); a policy entry
may carry cache overrides (`{policy: streaming_llm, overrides: {positions: in_cache}}`, or on the command line
`streaming_llm[positions=in_cache]`, the label its runs get in the tables). `streaming` (perplexity per position
bucket of one long stream) and `passkey` (accuracy by context length x depth) have builders of their own. Relative
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
CONFIGS = REPO / "configs"
TABLES = ("summarization", "qa", "ppl", "memory", "streaming", "passkey")
N_BOOT = 2000
SEED = 0
LEVEL = 0.95
# Task keys that never change what a table compares (they are listed separately or only name the data files).
TASK_KEYS_IGNORED = {"name", "kind", "gold_position"}
# Cache keys that never tell policies apart in a table (model_name only names the model, which is a column).
CACHE_KEYS_IGNORED = {"name", "budget", "model_name"}
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


def _override_value(v: Any) -> str:
    """A YAML value as a Hydra command-line value."""
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def policy_entry(p: str | dict) -> tuple[str, dict[str, Any]]:
    """(cache config name, cache overrides) of a table's policy: `name`, `name[key=value,...]` (the label the tables
    give a run whose cache settings differ from the config file's), or `{policy: name, overrides: {key: value}}`."""
    if isinstance(p, dict):
        if "policy" not in p or set(p) - {"policy", "overrides"}:
            raise SystemExit(
                f"error: policy entry {p!r} is invalid; allowed: {{policy: name, overrides: {{key: value}}}}"
            )
        return str(p["policy"]), dict(p.get("overrides") or {})
    name, _, rest = str(p).partition("[")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.rstrip("]").split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"error: policy {p!r} is invalid; allowed: name or name[key=value,...]")
        overrides[key.strip()] = value.strip()
    return name.strip(), overrides


def entry_label(name: str, overrides: dict[str, Any]) -> str:
    """The policy label runs of this entry get in the tables (cf. `_variant`)."""
    return _label(name, ",".join(f"{k}={v}" for k, v in sorted(overrides.items())))


def split_policies(value: str | None) -> list[str] | None:
    """A --policies list: commas or spaces between entries, not inside an entry's [key=value,...]."""
    items, depth, cur = [], 0, ""
    for ch in value or "":
        depth += (ch == "[") - (ch == "]")
        if ch in ", " and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items = [i for i in [*items, cur] if i]
    return items or None


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
        policy_variant = _variant(cache_cfg, _yaml(configs / "cache" / f"{policy_name}.yaml"), CACHE_KEYS_IGNORED)
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
    policies: list[str | dict]  # names, name[key=value,...], or {policy: name, overrides: {...}}
    budgets: list[float]
    reference: str
    profiles: dict[str, dict]
    jobs_from: str | None = None
    trained_context: dict[str, int] | None = None  # model -> tokens, where records do not say

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
            trained_context=d.get("trained_context"),
        )  # fmt: skip

    @property
    def task_names(self) -> list[str]:
        return list(dict.fromkeys(t["task"] for t in self.tasks))

    @property
    def policy_labels(self) -> list[str]:
        """The table's policies as run labels, reference first (their row order)."""
        return list(dict.fromkeys([self.reference, *(entry_label(*policy_entry(p)) for p in self.policies)]))


def _fmt_budget(b: Any) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "-"
    return f"{b:g}" if isinstance(b, (int, float)) else str(b)


# ------------------------------------------------------------------------------------------------ running


def job_commands(
    spec: Spec, model: str, limit: Any, policies: Sequence[str | dict], budgets: Sequence[float], runs_dir: str,
    device: str | None = None, logger: str = "none", extra: Sequence[str] = (), configs: Path = CONFIGS,
    python: str = sys.executable,
) -> tuple[list[list[str]], list[str]]:  # fmt: skip
    """Hydra multirun command lines for a table's jobs (per task entry: the budgeted policies x budgets, and the
    fixed-size ones with the reference; policies with cache overrides in commands of their own, one per set of
    overrides), and messages about skipped policies."""
    msgs = []
    entries: dict[str, tuple[str, dict]] = {}
    for p in [spec.reference, *policies]:
        name, overrides = policy_entry(p)
        entries.setdefault(entry_label(name, overrides), (name, overrides))
    groups: dict[tuple, list[str]] = {}  # (budgeted, overrides) -> policy names
    for label, (name, overrides) in entries.items():
        path = configs / "cache" / f"{name}.yaml"
        if not path.exists():
            msgs.append(f"skip policy {label}: configs/cache/{name}.yaml does not exist (yet)")
            continue
        cfg = _yaml(path)
        unknown = [k for k in overrides if k not in cfg]
        if unknown:
            msgs.append(f"skip policy {label}: {unknown[0]} is not a key of configs/cache/{name}.yaml (yet)")
            continue
        key = (cfg.get("budget") is not None, tuple((k, _override_value(v)) for k, v in sorted(overrides.items())))
        groups.setdefault(key, []).append(name)
    order = sorted(groups, key=lambda k: (not k[0], bool(k[1])))  # budgeted, then fixed; plain first (stable)
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
        for budgeted, overrides in order:
            if budgeted and not budgets:
                continue
            cmd = [python, str(REPO / "run.py"), "-m", *common, f"cache={','.join(groups[budgeted, overrides])}"]
            cmd += [f"cache.{k}={v}" for k, v in overrides]
            if budgeted:
                cmd.append(f"cache.budget={','.join(_fmt_budget(b) for b in budgets)}")
            cmds.append(cmd)
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
    builder: str = ""  # streaming and passkey tables have their own markdown and plot
    extra: dict = field(default_factory=dict)


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
    order = {p: i for i, p in enumerate([reference, *(policy_entry(p)[0] for p in spec.policies)])}
    out["_o"] = out["policy"].map(lambda p: order.get(p.split("[")[0], len(order)))
    out["_b"] = pd.to_numeric(out["budget"], errors="coerce").fillna(-1)
    out = out.sort_values(["task", "gold_position", "_o", "policy", "_b"], na_position="first", kind="stable")
    return out.drop(columns=["_o", "_b"]).reset_index(drop=True)


def _exp(x: np.ndarray) -> np.ndarray:
    return np.exp(x)


def build_table(spec: Spec, runs: Sequence[Run], model: str | None = None, policies: Sequence[str] | None = None,
                budgets: Sequence[float] | None = None) -> Table:  # fmt: skip
    """Select the spec's runs (tasks, model; optional policy/budget filters) and aggregate them."""
    mine, model, warn = select_runs(spec, runs, model, policies, budgets)
    return BUILDERS.get(spec.builder, build_budget_table)(spec, mine, model, warn)


def select_runs(spec: Spec, runs: Sequence[Run], model: str | None = None, policies: Sequence[str] | None = None,
                budgets: Sequence[float] | None = None) -> tuple[list[Run], str | None, list[str]]:  # fmt: skip
    """The spec's runs of one model (the given one, else the profile's when it has records, else the one with most
    runs), optionally only some policies (names or labels) and budgets; and warnings about them."""
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
    return mine, model, warn


def _no_records(kind: str, tasks: Sequence[str], model: str | None) -> str:
    return f"no {kind}records for tasks {', '.join(tasks)}" + (f" and model {model}" if model else "")


def build_budget_table(spec: Spec, mine: list[Run], model: str | None, warn: list[str]) -> Table:
    """Quality per policy and budget (summarization, qa, ppl, memory)."""
    df = sample_frame(mine)
    ref = spec.reference
    task_names = set(spec.task_names)
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
        allowed = ", ".join(["rouge", "qa", "ppl", "memory", *BUILDERS])
        raise ValueError(f"experiments/{spec.name}.yaml: builder={b} is unknown; allowed: {allowed}")
    frame = pd.DataFrame() if df.empty else _group_rows(df, spec, ref, metrics, rel, warn)
    if frame.empty:
        warn.append(_no_records("", sorted(task_names), model))
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
    if t.builder in MARKDOWN:
        return MARKDOWN[t.builder](t)
    lines = _markdown_header(t)
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


def _markdown_header(t: Table, more: Sequence[str] = ()) -> list[str]:
    """Title, what the records are (model, data, ROUGE, budget, pairing, `more`, dates and commits), notes."""
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
    lines += [f"- {line}" for line in more]
    commits = ", ".join(m["record_commits"]) or "-"
    lines.append(f"- records {m['records_from']} .. {m['records_to']}, commit(s) {commits}")
    lines.append("")
    if t.warnings:
        lines += ["**Notes**", ""] + [f"- {w}" for w in t.warnings] + [""]
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(t: Table, path: Path) -> None:
    """Quality relative to full vs KV budget (memory: vs measured KV bytes relative to full), one line per policy,
    full as a horizontal line, 95% bootstrap bands. Without a full run: the absolute metric, no bands."""
    if t.builder in PLOTS:
        return PLOTS[t.builder](t, path)
    plt = _pyplot()

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
    out_dir.mkdir(parents=True, exist_ok=True)
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
        if m.get("plot"):
            lines.append(f"- plot: {m['plot']}")
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
        tables.append(t)
        if t.frame.empty:  # nothing to show: no files (a clone without such records keeps its results unchanged)
            print(f"[tables] {name}: no records ({t.meta['model']}), not written")
            continue
        paths = write_table(t, out_dir)
        print(f"[tables] {name}: {len(t.frame)} rows ({t.meta['model']}) -> {', '.join(str(p) for p in paths[:3])}")
        for w in t.warnings:
            print(f"[tables]   note: {w}")
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


# ------------------------------------------------------------------------------------------------ streaming, passkey


def _order_key(spec: Spec, policy: str) -> int:
    """Row order: the spec's entries (labels), then other variants of its policies, then anything else."""
    labels = spec.policy_labels
    names = list(dict.fromkeys(policy_entry(p)[0] for p in labels))
    if policy in labels:
        return labels.index(policy)
    base = policy.split("[")[0]
    return len(labels) + (names.index(base) if base in names else len(names))


def _sorted_rows(rows: list[dict], spec: Spec, keys: Sequence[str] = ()) -> pd.DataFrame:
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["_o"] = out["policy"].map(lambda p: _order_key(spec, p))
    out["_b"] = pd.to_numeric(out["budget"], errors="coerce").fillna(-1)
    out = out.sort_values(["task", "_o", "policy", "_b", *keys], kind="stable")
    return out.drop(columns=["_o", "_b"]).reset_index(drop=True)


def trained_context(spec: Spec, runs: Sequence[Run], model: str | None) -> int | None:
    """The model's trained context: as the records' summaries say (model_max_positions), else the spec's map."""
    found = sorted({int(r.summary["model_max_positions"]) for r in runs if r.summary.get("model_max_positions")})
    if found:
        return found[-1]
    return (spec.trained_context or {}).get(model)


def _tokens(n: float) -> str:
    n = int(n)
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _bucket_cols(frame: pd.DataFrame, prefix: str = "ppl@") -> list[str]:
    cols = [c for c in frame.columns if c.startswith(prefix)]
    return sorted(cols, key=lambda c: tuple(int(x) for x in c[len(prefix) :].split("-")))


def _bucket_bounds(col: str) -> tuple[int, int]:
    a, b = col.split("@", 1)[1].split("-")
    return int(a), int(b)


def build_streaming_table(spec: Spec, mine: list[Run], model: str | None, warn: list[str]) -> Table:
    """Perplexity per position bucket per policy (rows) from streaming-perplexity records (`bucket_*` metrics):
    token-weighted over the streams of a run, bucket by bucket."""
    rows = []
    for r in mine:
        recs = [s for s in r.samples if "bucket_nll_sum" in (s.get("metrics") or {})]
        if len(recs) < len(r.samples):
            warn.append(
                f"{r.task} x {r.policy}: {len(r.samples) - len(recs)} samples without position buckets, left out"
            )
        layout = (recs[0]["metrics"]["bucket_start"], recs[0]["metrics"]["bucket_tokens"]) if recs else None
        same = [s for s in recs if (s["metrics"]["bucket_start"], s["metrics"]["bucket_tokens"]) == layout]
        if len(same) < len(recs):
            warn.append(f"{r.task} x {r.policy}: {len(recs) - len(same)} streams with other buckets, left out")
        if not same:
            continue
        nll = np.sum([s["metrics"]["bucket_nll_sum"] for s in same], axis=0)
        count = np.sum([s["metrics"]["bucket_tokens"] for s in same], axis=0)
        tokens = sum(s["metrics"]["n_tokens"] for s in same)
        row = {
            "task": r.task, "policy": r.policy, "budget": r.budget, "n": len(same), "tokens": tokens,
            "ppl": math.exp(sum(s["metrics"]["nll_sum"] for s in same) / tokens),
            "kv_mean": float(np.mean([s.get("kv_tokens_mean", math.nan) for s in same])),
            "kv_peak": float(np.mean([s.get("kv_tokens_peak", math.nan) for s in same])),
        }  # fmt: skip
        kv = [s.get("bucket_kv_tokens_mean") for s in same]
        for k, (start, n_tok) in enumerate(zip(*layout)):
            row[f"ppl@{start}-{start + n_tok}"] = math.exp(nll[k] / count[k])
            row[f"kv@{start}-{start + n_tok}"] = float(np.mean([v[k] for v in kv])) if all(kv) else math.nan
        rows.append(row)
    frame = _sorted_rows(rows, spec)
    if frame.empty:
        warn.append(_no_records("streaming ", spec.task_names, model))
    else:
        ppl_cols, kv_cols = _bucket_cols(frame), _bucket_cols(frame, "kv@")
        frame = frame[["task", "policy", "budget", "n", "tokens", "ppl", "kv_mean", "kv_peak", *ppl_cols, *kv_cols]]
    frame.insert(0, "model", model)
    ctx = trained_context(spec, mine, model)
    meta = table_meta(spec, mine, model) | {
        "trained_context": ctx, "plot": "perplexity per position bucket vs tokens seen, one line per policy"
        + (f", the trained context ({ctx}) marked" if ctx else ""),
    }  # fmt: skip
    cols = ["task", "policy", "budget", "n", "ppl", "kv_mean"]
    label = "perplexity per position bucket (lower is better)"
    return Table(spec.name, spec.title, frame, cols, None, label, list(dict.fromkeys(warn)), meta, spec.reference,
                 "streaming", {"trained_context": ctx})  # fmt: skip


def streaming_markdown(t: Table) -> str:
    ctx = t.extra.get("trained_context")
    more = [
        "columns: perplexity of the tokens at stream positions [start, end), each predicted after that many tokens "
        "of the one stream had gone through the cache (the first bucket starts after the prefix); `ppl` = all of them",
        "every policy at the same int budget (tokens stored after each step); `full` keeps every token",
    ]
    if ctx:
        more.append(
            f"trained context of `{t.meta['model']}`: {ctx} tokens; † = a bucket reaching past it (RoPE positions "
            "the model never saw in training, for a cache that keeps absolute positions)"
        )
    lines = _markdown_header(t, more)
    for task, g in t.frame.groupby("task", sort=False):
        buckets = [c for c in _bucket_cols(g) if g[c].notna().any()]
        heads = [HEADERS.get(c, c) for c in t.markdown_columns if c != "task"]
        for c in buckets:
            a, b = _bucket_bounds(c)
            heads.append(f"{_tokens(a)}–{_tokens(b)}" + (" †" if ctx and b > ctx else ""))
        lines += [f"## {task}", "", "| " + " | ".join(heads) + " |"]
        lines.append("|---|" + "|".join("---:" for _ in heads[1:]) + "|")
        for _, row in g.iterrows():
            cells = [_cell(row.get(c), c) for c in t.markdown_columns if c != "task"]
            cells += [_cell(row[c], "ppl") for c in buckets]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def streaming_plot(t: Table, path: Path) -> None:
    """Perplexity per bucket vs tokens seen (a step per bucket), one line per policy, log y, the trained context as
    a vertical line."""
    plt = _pyplot()
    groups = list(t.frame.groupby("task", sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4.2), squeeze=False)
    ctx = t.extra.get("trained_context")
    for ax, (task, g) in zip(axes[0], groups):
        buckets = [c for c in _bucket_cols(g) if g[c].notna().any()]
        bounds = [_bucket_bounds(c) for c in buckets]
        xs = [a for a, _ in bounds] + [bounds[-1][1]]
        for _, row in g.iterrows():
            ys = row[buckets].to_numpy(float)
            label = row["policy"] + (f" ({_fmt_budget(row['budget'])})" if row["budget"] is not None else "")
            style = {"color": "black", "linestyle": "--"} if row["policy"] == t.reference else {}
            ax.step(xs, [*ys, ys[-1]], where="post", label=label, linewidth=1.3, **style)
        if ctx:
            ax.axvline(ctx, color="grey", linestyle=":", linewidth=1.2, label=f"trained context ({ctx})")
        ax.set_yscale("log")
        ax.set_xlabel("tokens seen (stream position)")
        ax.set_ylabel("perplexity of the bucket", fontsize=8)
        ax.set_title(str(task), fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"{t.title} ({t.meta['model']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _passkey_axes(rec: dict) -> tuple[int | None, float | None]:
    """(requested context length, key depth) of a passkey record: its fields, else its per-length and per-depth
    metric keys (records from before the fields existed)."""
    length, depth = rec.get("length"), rec.get("depth")
    for key in rec.get("metrics") or {}:
        if length is None and key.startswith("accuracy@") and key[9:].isdigit():
            length = int(key[9:])
        elif depth is None and key.startswith("accuracy@depth"):
            depth = float(key[14:])
    return length, depth


def build_passkey_table(spec: Spec, mine: list[Run], model: str | None, warn: list[str]) -> Table:
    """Passkey accuracy per policy x context length x key depth (one row each)."""
    rows = []
    for r in mine:
        for s in r.samples:
            length, depth = _passkey_axes(s)
            if length is None or depth is None or "accuracy" not in (s.get("metrics") or {}):
                warn.append(f"{r.task} x {r.policy}: sample {s.get('id')} has no length/depth/accuracy, left out")
                continue
            rows.append({
                "task": r.task, "policy": r.policy, "budget": r.budget, "length": length, "depth": depth,
                "accuracy": s["metrics"]["accuracy"], "kv_mean": s.get("kv_tokens_mean", math.nan),
                "kv_peak": s.get("kv_tokens_peak", math.nan), "prompt_tokens": s.get("prompt_tokens"),
            })  # fmt: skip
    df = pd.DataFrame(rows)
    cols = ["task", "policy", "budget", "length", "depth", "n", "accuracy", "kv_mean", "kv_peak", "prompt_tokens"]
    if df.empty:
        warn.append(_no_records("passkey ", spec.task_names, model))
        frame = pd.DataFrame(columns=cols)
    else:
        df["_budget"] = df["budget"].map(_fmt_budget)
        keys = ["task", "policy", "_budget", "length", "depth"]
        grouped = []
        for _, g in df.groupby(keys, sort=False, dropna=False):
            first = g.iloc[0]
            grouped.append({"task": first["task"], "policy": first["policy"], "budget": first["budget"],
                            "length": int(first["length"]), "depth": float(first["depth"]), "n": len(g),
                            "accuracy": g["accuracy"].mean(), "kv_mean": g["kv_mean"].mean(),
                            "kv_peak": g["kv_peak"].mean(), "prompt_tokens": g["prompt_tokens"].mean()})  # fmt: skip
        frame = _sorted_rows(grouped, spec, ["length", "depth"])[cols]
    frame.insert(0, "model", model)
    ctx = trained_context(spec, mine, model)
    meta = table_meta(spec, mine, model) | {
        "trained_context": ctx, "plot": "accuracy per context length (columns) and key depth (rows), one panel per "
        "policy; SYNTHETIC prompts",
    }  # fmt: skip
    label = "passkey accuracy"
    return Table(spec.name, spec.title, frame, cols, None, label, list(dict.fromkeys(warn)), meta, spec.reference,
                 "passkey", {"trained_context": ctx})  # fmt: skip


def _passkey_groups(frame: pd.DataFrame):
    """(task, policy, budget, rows) per policy and budget, in the frame's order."""
    f = frame.assign(_budget=frame["budget"].map(_fmt_budget))
    for (task, policy, _), g in f.groupby(["task", "policy", "_budget"], sort=False):
        yield task, policy, g["budget"].iloc[0], g


def passkey_markdown(t: Table) -> str:
    ctx = t.extra.get("trained_context")
    more = [
        "**SYNTHETIC data**: filler text with a 5-digit key at a given depth, generated from a seed "
        "(buzz/tasks/passkey.py), not a downloaded benchmark",
        "accuracy: the key appears in the answer; length = the prompt's tokens as requested (the prompt lands within "
        "a few tokens), depth = where the key sits in the filler (0 = start, 1 = end)",
        "every policy at the same int budget (tokens stored after each forward); `full` keeps every token",
    ]
    if ctx:
        more.append(f"trained context of `{t.meta['model']}`: {ctx} tokens; † = a length past it")
    lines = _markdown_header(t, more)

    def head(n: int) -> str:
        return _tokens(n) + (" †" if ctx and n > ctx else "")

    for task, g in t.frame.groupby("task", sort=False):
        lengths = sorted(g["length"].unique())
        lines += [f"## {task}", "", "Accuracy by context length (all depths):", ""]
        lines.append("| policy | budget | n | all | " + " | ".join(head(n) for n in lengths) + " |")
        lines.append("|---|" + "|".join("---:" for _ in range(3 + len(lengths))) + "|")
        grids = []
        for _, policy, budget, p in _passkey_groups(g):
            acc = (p["accuracy"] * p["n"]).groupby(p["length"]).sum() / p["n"].groupby(p["length"]).sum()
            total = float((p["accuracy"] * p["n"]).sum() / p["n"].sum())
            cells = [policy, _fmt_budget(budget), str(int(p["n"].sum())), f"{total:.2f}"]
            lines.append("| " + " | ".join(cells + [f"{acc[n]:.2f}" if n in acc else "-" for n in lengths]) + " |")
            grid = p.pivot_table(index="depth", columns="length", values="accuracy", aggfunc="mean")
            grids.append((policy, budget, grid))
        lines.append("")
        for policy, budget, grid in grids:
            lines += [f"### {policy}, budget {_fmt_budget(budget)}: accuracy by depth (rows) and length", ""]
            lines.append("| depth | " + " | ".join(head(n) for n in lengths) + " |")
            lines.append("|---:|" + "|".join("---:" for _ in lengths) + "|")
            for depth, r in grid.iterrows():
                vals = [f"{r[n]:.2f}" if n in r and not math.isnan(r[n]) else "-" for n in lengths]
                lines.append(f"| {depth:g} | " + " | ".join(vals) + " |")
            lines.append("")
    return "\n".join(lines)


def passkey_plot(t: Table, path: Path) -> None:
    """One heat map per task x policy x budget: accuracy by key depth (rows) and context length (columns)."""
    plt = _pyplot()
    panels = list(_passkey_groups(t.frame))
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.4 * ncols + 1.0, 2.8 * nrows + 0.8), squeeze=False, layout="constrained"
    )
    several = t.frame["task"].nunique() > 1
    ctx = t.extra.get("trained_context")
    image = None
    for ax, (task, policy, budget, p) in zip(axes.flat, panels):
        grid = p.pivot_table(index="depth", columns="length", values="accuracy", aggfunc="mean")
        image = ax.imshow(grid.to_numpy(float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(grid.to_numpy(float)):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(grid.columns)), [_tokens(n) for n in grid.columns], fontsize=7)
        ax.set_yticks(range(len(grid.index)), [f"{d:g}" for d in grid.index], fontsize=7)
        past = [j for j, n in enumerate(grid.columns) if ctx and n > ctx]
        if past:
            ax.axvline(past[0] - 0.5, color="red", linewidth=1.5)
        ax.set_title(f"{policy} ({_fmt_budget(budget)})" + (f"\n{task}" if several else ""), fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=7)
        ax.set_ylabel("key depth", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    note = f"\nred line: the model's trained context ({ctx} tokens)" if ctx else ""
    fig.suptitle(f"{t.title} ({t.meta['model']}){note}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


BUILDERS: dict[str, Callable[[Spec, list[Run], str | None, list[str]], Table]] = {
    "streaming": build_streaming_table,
    "passkey": build_passkey_table,
}
MARKDOWN: dict[str, Callable[[Table], str]] = {"streaming": streaming_markdown, "passkey": passkey_markdown}
PLOTS: dict[str, Callable[[Table, Path], None]] = {"streaming": streaming_plot, "passkey": passkey_plot}


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
        p.add_argument(
            "--policies",
            default=None,
            help="comma list, name[key=value] for cache overrides (run: default the table's; render: all found)",
        )
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
    policies, budgets = split_policies(a.policies), _list(a.budgets)
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

"""Tables from run records (buzz/tables.py): rendering, pairing, relative figures and their bootstrap intervals."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from buzz import tables
from buzz.tables import Spec, build_table, job_commands, load_runs, paired_bootstrap, render

FIXTURE = Path(__file__).parent / "fixtures" / "records" / "runs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root: Path, task: str, policy: str, budget, samples: dict[str, dict], *, model: str = "m",
              gold: int | None = None, cache_extra: dict | None = None, status: str = "done") -> Path:  # fmt: skip
    """A run directory as the runner writes it: summary.json (config, data, status) and samples.jsonl."""
    kind = "perplexity" if task == "wikitext" else "generate"
    task_cfg = {"name": task, "kind": kind} | ({"gold_position": gold} if gold is not None else {})
    cache_cfg = {"name": policy, "budget": budget} | (cache_extra or {})
    parent = root / task / model
    d = parent / f"{policy}-b{budget}-{len(list(parent.glob('*'))) if parent.exists() else 0:08d}"
    d.mkdir(parents=True)
    summary = {
        "status": status, "n": len(samples), "task": task, "model": model, "cache": policy, "budget": budget,
        "data": {"origin": "offline", "location": f"/data/{task}.jsonl", "split": "test", "synthetic": task == "qa10",
                 "note": ""},
        "metric_info": {"rouge": "rouge_score", "rouge_description": "test"} if task in ("xsum", "cnn_dm") else {},
        "config": {"model": {"name": model}, "task": task_cfg, "cache": cache_cfg, "seed": 0},
        "environment": {"git_commit": "abc123"},
    }  # fmt: skip
    (d / "summary.json").write_text(json.dumps(summary))
    with (d / "samples.jsonl").open("w") as f:
        for sid, metrics in samples.items():
            rec = {"id": sid, "prompt_tokens": 100, "metrics": metrics, "kv_tokens_mean": 50.0, "kv_tokens_peak": 60,
                   "kv_bytes_peak": 600, "kv_bytes_full": 1000, "prefill_ms": 1.0, "decode_ms_per_step": 2.0,
                   "batch_tokens_per_s": 3.0}  # fmt: skip
            f.write(json.dumps(rec) + "\n")
    return d


def rouge(values: dict[str, float]) -> dict[str, dict]:
    return {k: {"rouge1": v, "rouge2": v / 2, "rougeL": v} for k, v in values.items()}


def summ_table(root: Path, **kw) -> tables.Table:
    runs, _ = load_runs(root)
    return build_table(Spec.load("summarization"), runs, **kw)


def row(t: tables.Table, policy: str, budget=None, task: str = "xsum") -> pd.Series:
    f = t.frame[(t.frame["policy"] == policy) & (t.frame["task"] == task)]
    if budget is not None:
        f = f[f["budget"] == budget]
    assert len(f) == 1, f
    return f.iloc[0]


# ------------------------------------------------------------------------------------------------ rendering


def test_render_all_from_fixture(tmp_path):
    assert FIXTURE.is_dir(), "run bash tests/fixtures/records/generate.sh"
    out = tmp_path / "results"
    got = render(list(tables.TABLES), FIXTURE, out)
    assert [t.name for t in got] == list(tables.TABLES)
    for name in tables.TABLES:
        for ext in ("md", "csv", "png", "json"):
            assert (out / f"{name}.{ext}").stat().st_size > 0, (name, ext)
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
        md = (out / f"{name}.md").read_text()
        assert md.startswith("# ") and "model: `tiny-llama`" in md
        assert "| policy |" in md
        df = pd.read_csv(out / f"{name}.csv")
        assert len(df) > 0 and (df["n"] > 0).all()
        assert {"model", "task", "policy", "budget", "n"} <= set(df.columns)
    summ = pd.read_csv(out / "summarization.csv")
    need = {"task", "policy", "budget", "n", "rouge1", "rouge2", "rougeL", "rel_rougeL", "rel_rougeL_lo",
            "rel_rougeL_hi", "kv_mean", "kv_peak"}  # fmt: skip
    assert need <= set(summ.columns)
    # Labels gain "[key=value]" when a config default changes after the fixture was recorded: compare base names.
    assert {t.split("[")[0] for t in summ["task"]} == {"cnn_dm", "xsum"}
    assert {"full", "window", "h2o"} <= {p.split("[")[0] for p in summ["policy"]}
    assert (summ.loc[summ["policy"] == "full", "rel_rougeL"] == 1.0).all()
    qa = pd.read_csv(out / "qa.csv")
    assert set(qa["gold_position"]) == {0, 4, 9} and "rel_accuracy" in qa
    ppl = pd.read_csv(out / "ppl.csv")
    assert {"ppl", "rel_ppl", "rel_ppl_lo", "rel_ppl_hi"} <= set(ppl.columns)
    budgeted = ppl[ppl["policy"] != "full"]
    assert np.isfinite(budgeted["rel_ppl"]).all()
    assert (budgeted["rel_ppl_lo"] <= budgeted["rel_ppl"] + 1e-12).all()
    assert (budgeted["rel_ppl"] <= budgeted["rel_ppl_hi"] + 1e-12).all()
    mem = pd.read_csv(out / "memory.csv")
    assert {"kv_mean", "kv_peak", "kv_bytes_peak", "kv_ratio", "prefill_ms", "decode_ms"} <= set(mem.columns)
    readme = (out / "README.md").read_text()
    for name in tables.TABLES:
        assert f"({name}.md)" in readme and f"({name}.png)" in readme
    assert "SYNTHETIC" in readme and "**real**" in readme and "rouge_score" in readme
    meta = json.loads((out / "qa.json").read_text())
    assert meta["model"] == "tiny-llama" and meta["record_commits"]


def test_render_cli_twice_is_stable(tmp_path):
    args = ["render", "summarization", "--runs-dir", str(FIXTURE), "--output", str(tmp_path)]
    assert tables.main(args) == 0
    first = (tmp_path / "summarization.csv").read_text()
    assert tables.main(args) == 0
    assert (tmp_path / "summarization.csv").read_text() == first  # fixed bootstrap seed


# ------------------------------------------------------------------------------------------------ relative figures


def test_rel_rougeL_hand_computed(tmp_path):
    write_run(tmp_path, "xsum", "full", None, rouge({"a": 0.2, "b": 0.4, "c": 0.6}))
    write_run(tmp_path, "xsum", "window", 0.5, rouge({"a": 0.1, "b": 0.2, "c": 0.3}))
    write_run(tmp_path, "xsum", "h2o", 0.5, rouge({"a": 0.2, "b": 0.2, "c": 0.5}))
    t = summ_table(tmp_path)
    full, window, h2o = row(t, "full"), row(t, "window"), row(t, "h2o")
    assert full["rel_rougeL"] == 1.0 and full["rel_rougeL_lo"] == 1.0 and full["rel_rougeL_hi"] == 1.0
    assert window["rel_rougeL"] == pytest.approx(0.5)
    assert window["rel_rougeL_lo"] == pytest.approx(0.5) and window["rel_rougeL_hi"] == pytest.approx(0.5)
    assert h2o["rel_rougeL"] == pytest.approx(0.9 / 1.2)
    assert h2o["rougeL"] == pytest.approx(0.3) and h2o["rouge2"] == pytest.approx(0.15) and h2o["n"] == 3
    assert h2o["rel_rougeL_lo"] <= h2o["rel_rougeL"] <= h2o["rel_rougeL_hi"]
    out = tmp_path / "out"
    tables.write_table(t, out)
    csv = pd.read_csv(out / "summarization.csv")
    assert csv.loc[csv["policy"] == "h2o", "rel_rougeL"].item() == pytest.approx(0.75)
    assert list(csv["policy"]) == ["full", "window", "h2o"]  # reference first, then the table's policy order


def test_pairing_uses_only_common_sample_ids(tmp_path):
    write_run(tmp_path, "xsum", "full", None, rouge({"a": 0.2, "b": 0.4, "c": 0.6}))
    # "d" has no full record: it must not enter the ratio (it would push it far above 1).
    write_run(tmp_path, "xsum", "window", 0.5, rouge({"b": 0.2, "c": 0.3, "d": 100.0}))
    t = summ_table(tmp_path)
    w = row(t, "window")
    assert w["n"] == 3 and w["n_paired"] == 2
    assert w["rel_rougeL"] == pytest.approx(0.5 / 1.0)
    assert any("1 of 3 samples have no full record" in n for n in t.warnings)


def test_missing_full_is_reported_not_fatal(tmp_path):
    write_run(tmp_path, "xsum", "window", 0.5, rouge({"a": 0.1, "b": 0.2}))
    write_run(tmp_path, "xsum", "h2o", 0.2, rouge({"a": 0.3, "b": 0.2}))
    t = summ_table(tmp_path)
    assert t.frame["rel_rougeL"].isna().all()
    assert row(t, "window")["rougeL"] == pytest.approx(0.15)
    assert any("no full run" in w for w in t.warnings)
    paths = tables.write_table(t, tmp_path / "out")
    md = paths[0].read_text()
    assert "no full run" in md and "| window |" in md
    assert paths[2].read_bytes()[:8] == PNG_MAGIC
    tables.write_index(tmp_path / "out")


def test_no_records_at_all(tmp_path):
    got = render(list(tables.TABLES), tmp_path / "nothing", tmp_path / "out")
    for t in got:
        assert t.frame.empty
        assert "_No records._" in (tmp_path / "out" / f"{t.name}.md").read_text()
    assert (tmp_path / "out" / "README.md").exists()


def test_qa_relative_per_gold_position(tmp_path):
    acc = {0: ([1, 1, 0, 1], [1, 0, 0, 1]), 9: ([1, 0, 1, 0], [0, 0, 1, 0])}
    for gold, (full, window) in acc.items():
        ids = [f"q{i}" for i in range(4)]
        write_run(tmp_path, "qa10", "full", None, {i: {"accuracy": a} for i, a in zip(ids, full)}, gold=gold)
        write_run(tmp_path, "qa10", "window", 0.5, {i: {"accuracy": a} for i, a in zip(ids, window)}, gold=gold)
    runs, _ = load_runs(tmp_path)
    t = build_table(Spec.load("qa"), runs)
    f = t.frame.set_index(["gold_position", "policy"])
    assert f.loc[(0, "window"), "rel_accuracy"] == pytest.approx(2 / 3)
    assert f.loc[(9, "window"), "rel_accuracy"] == pytest.approx(1 / 2)
    assert f.loc[(9, "window"), "accuracy"] == pytest.approx(0.25)
    assert f.loc[(0, "full"), "rel_accuracy"] == 1.0


def test_ppl_ratio_from_token_weighted_nll(tmp_path):
    full = {"s0": {"nll_sum": 100.0, "n_tokens": 50}, "s1": {"nll_sum": 300.0, "n_tokens": 150}}
    win = {"s0": {"nll_sum": 120.0, "n_tokens": 50}, "s1": {"nll_sum": 360.0, "n_tokens": 150}}
    write_run(tmp_path, "wikitext", "full", None, full)
    write_run(tmp_path, "wikitext", "window", 0.5, win)
    runs, _ = load_runs(tmp_path)
    t = build_table(Spec.load("ppl"), runs)
    f = t.frame.set_index("policy")
    assert f.loc["full", "ppl"] == pytest.approx(math.exp(2.0))
    assert f.loc["window", "ppl"] == pytest.approx(math.exp(2.4))
    assert f.loc["window", "rel_ppl"] == pytest.approx(math.exp(0.4))
    assert f.loc["window", "tokens"] == 200


# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_contains_point_and_shrinks_with_more_documents():
    rng = np.random.default_rng(1)

    def draw(n):
        ref = rng.uniform(0.1, 0.5, n)
        return ref * rng.uniform(0.6, 1.0, n), ref

    widths = []
    for n in (20, 2000):
        point, lo, hi = paired_bootstrap(*draw(n))
        assert lo <= point <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 4
    x, y = draw(50)
    assert paired_bootstrap(x, y) == paired_bootstrap(x, y)  # fixed seed
    assert paired_bootstrap(x, y)[0] == pytest.approx(x.mean() / y.mean())


def test_bootstrap_is_paired():
    # Policy = 0.8 x reference per document: every paired resample gives exactly 0.8, however spread the documents.
    ref = np.linspace(0.05, 0.9, 40)
    point, lo, hi = paired_bootstrap(0.8 * ref, ref)
    assert point == pytest.approx(0.8) and lo == pytest.approx(0.8) and hi == pytest.approx(0.8)


def test_bootstrap_rejects_unpaired_arrays():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])


# ------------------------------------------------------------------------------------------------ records and jobs


def test_variants_duplicates_and_filters(tmp_path):
    write_run(tmp_path, "xsum", "full", None, rouge({"a": 0.2, "b": 0.4}))
    write_run(tmp_path, "xsum", "h2o", 0.5, rouge({"a": 0.1}))
    write_run(tmp_path, "xsum", "h2o", 0.5, rouge({"a": 0.1, "b": 0.2}))  # same job, more samples: kept
    write_run(tmp_path, "xsum", "h2o", 0.5, rouge({"a": 0.2, "b": 0.4}), cache_extra={"recent": 0.25})
    write_run(tmp_path, "xsum", "window", 0.2, rouge({"a": 0.2, "b": 0.4}))
    write_run(tmp_path, "xsum", "full", None, rouge({"a": 0.2, "b": 0.4}), model="other")
    runs, warn = load_runs(tmp_path)
    assert any("two runs of xsum x m x h2o" in w for w in warn)
    t = summ_table(tmp_path)
    assert set(t.frame["policy"]) == {"full", "h2o", "h2o[recent=0.25]", "window"}
    assert row(t, "h2o")["n"] == 2 and row(t, "h2o[recent=0.25]")["rel_rougeL"] == pytest.approx(1.0)
    assert any("other models" in w for w in t.warnings)
    t = summ_table(tmp_path, policies=["window"], budgets=[0.2])
    assert set(t.frame["policy"]) == {"full", "window"}
    assert set(summ_table(tmp_path, model="other").frame["policy"]) == {"full"}


def test_job_commands_skip_missing_policies(tmp_path):
    configs = tmp_path / "configs"
    (configs / "cache").mkdir(parents=True)
    (configs / "cache" / "full.yaml").write_text("name: full\nbudget: null\n")
    (configs / "cache" / "window.yaml").write_text("name: window\nbudget: 0.5\n")
    (configs / "cache" / "fixed.yaml").write_text("name: fixed\nbudget: null\nsize: 8\n")
    spec = Spec.load("summarization")
    cmds, msgs = job_commands(spec, "tiny-llama", 2, ["window", "fixed", "nope"], ["0.2", "0.5"], "/tmp/r",
                              configs=configs, python="py")  # fmt: skip
    assert msgs == ["skip policy nope: configs/cache/nope.yaml does not exist (yet)"]
    assert len(cmds) == 4  # per task: the budgeted sweep, and the reference with the fixed-size policies
    assert "cache=window" in cmds[0] and "cache.budget=0.2,0.5" in cmds[0] and "-m" in cmds[0]
    assert "cache=full,fixed" in cmds[1] and not any(c.startswith("cache.budget") for c in cmds[1])
    assert "task=cnn_dm" in cmds[0] and "task=xsum" in cmds[2] and "limit=2" in cmds[0]
    assert "output_dir=/tmp/r" in cmds[0] and "logger=none" in cmds[0]
    paper = Spec.load("qa").profiles["paper"]
    cmds, _ = job_commands(Spec.load("qa"), paper["model"], paper["limit"], ["window"], ["0.5"], "/r", configs=configs)
    assert [c for c in cmds[0] if c.startswith("task.gold")] == ["task.gold_position=0"] and "limit=null" in cmds[0]


def test_every_table_spec_loads():
    for name in tables.TABLES:
        spec = Spec.load(name)
        assert spec.tasks and spec.reference == "full" and "paper" in spec.profiles
    assert Spec.load("memory").task_names == Spec.load("summarization").task_names


def test_export_then_render_is_byte_identical(tmp_path):
    """The committed tables re-render byte for byte from the committed records, whatever the files' times (a
    clone resets them), and the export keeps none of the datasets' reference texts."""
    records = tmp_path / "records"
    assert tables.export(FIXTURE, records) > 0
    for path in records.rglob("samples.jsonl"):
        assert all("reference" not in json.loads(line) for line in path.read_text().splitlines())
    outs = []
    for i in range(2):
        for path in records.rglob("*"):
            if path.is_file():
                os.utime(path, (1e9 + i * 1e6, 1e9 + i * 1e6))
        out = tmp_path / f"out{i}"
        render(list(tables.TABLES), records, out)
        outs.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) >= 4 * 4 + 1
    for name in outs[0]:
        assert outs[0][name] == outs[1][name], name

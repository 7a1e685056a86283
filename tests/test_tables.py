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
              gold: int | None = None, cache_extra: dict | None = None, status: str = "done",
              fields: dict[str, dict] | None = None, summary_extra: dict | None = None) -> Path:  # fmt: skip
    """A run directory as the runner writes it: summary.json (config, data, status) and samples.jsonl. `fields`:
    more record fields per sample id."""
    kind = "perplexity" if task.startswith("wikitext") else "generate"
    task_cfg = {"name": task, "kind": kind} | ({"gold_position": gold} if gold is not None else {})
    cache_cfg = {"name": policy, "budget": budget} | (cache_extra or {})
    parent = root / task / model
    d = parent / f"{policy}-b{budget}-{len(list(parent.glob('*'))) if parent.exists() else 0:08d}"
    d.mkdir(parents=True)
    summary = {
        "status": status, "n": len(samples), "task": task, "model": model, "cache": policy, "budget": budget,
        "data": {"origin": "offline", "location": f"/data/{task}.jsonl", "split": "test",
                 "synthetic": task in ("qa10", "passkey"), "note": ""},
        "metric_info": {"rouge": "rouge_score", "rouge_description": "test"} if task in ("xsum", "cnn_dm") else {},
        "config": {"model": {"name": model}, "task": task_cfg, "cache": cache_cfg, "seed": 0},
        "environment": {"git_commit": "abc123"},
    } | (summary_extra or {})  # fmt: skip
    (d / "summary.json").write_text(json.dumps(summary))
    with (d / "samples.jsonl").open("w") as f:
        for sid, metrics in samples.items():
            rec = {"id": sid, "prompt_tokens": 100, "metrics": metrics, "kv_tokens_mean": 50.0, "kv_tokens_peak": 60,
                   "kv_bytes_peak": 600, "kv_bytes_full": 1000, "prefill_ms": 1.0, "decode_ms_per_step": 2.0,
                   "batch_tokens_per_s": 3.0} | (fields or {}).get(sid, {})  # fmt: skip
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
    stream = pd.read_csv(out / "streaming.csv")
    assert list(stream["policy"]) == ["full", "streaming_llm", "cascading", "h2o", "buzz", "streaming_llm[sink=2]"]
    buckets = ["ppl@32-128", "ppl@128-256", "ppl@256-384", "ppl@384-512"]
    assert buckets == [c for c in stream.columns if c.startswith("ppl@")] and (stream[buckets] > 1).all().all()
    assert (stream["tokens"] == 480).all() and (stream.loc[stream["policy"] != "full", "kv_peak"] <= 64).all()
    md = (out / "streaming.md").read_text()
    assert "| 32–128 | 128–256 | 256–384 † | 384–512 † |" in md and "trained context of `tiny-llama`: 256" in md
    passkey = pd.read_csv(out / "passkey.csv")
    assert set(passkey["length"]) == {128, 384} and set(passkey["depth"]) == {0.0, 1.0} and (passkey["n"] == 1).all()
    assert set(passkey["policy"]) == {"full", "streaming_llm", "h2o", "cascading"}
    md = (out / "passkey.md").read_text()
    assert "SYNTHETIC" in md.splitlines()[0] and "**SYNTHETIC data**" in md and "| 128 | 384 † |" in md
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


def test_no_records_at_all(tmp_path, capsys):
    """A table without rows is not written (a clone without such records keeps its results as they are); the
    index says there are none. Markdown still says so where a table is built by hand."""
    got = render(list(tables.TABLES), tmp_path / "nothing", tmp_path / "out")
    assert [t.name for t in got] == list(tables.TABLES)
    printed = capsys.readouterr().out
    for t in got:
        assert t.frame.empty
        assert f"[tables] {t.name}: no records (smollm2-135m), not written" in printed
        assert not list((tmp_path / "out").glob(f"{t.name}.*"))
    assert "_No tables yet._" in (tmp_path / "out" / "README.md").read_text()
    assert "_No records._" in tables.to_markdown(got[0])


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


def cache_configs(tmp_path: Path, **caches: str) -> Path:
    """A configs/ folder whose cache group holds, per policy, `name: <policy>` and the given YAML lines."""
    configs = tmp_path / "configs"
    (configs / "cache").mkdir(parents=True)
    for name, body in caches.items():
        (configs / "cache" / f"{name}.yaml").write_text(f"name: {name}\n{body}\n")
    return configs


def test_job_commands_skip_missing_policies(tmp_path):
    configs = cache_configs(tmp_path, full="budget: null", window="budget: 0.5", fixed="budget: null\nsize: 8")
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


def test_committed_tables_rerender_byte_identical(tmp_path):
    """`make tables-render` on the committed records re-creates every committed table, plot and the index byte for
    byte, and writes nothing for a table without records (e.g. listed policies or tables not run yet)."""
    records, results = tables.REPO / "results" / "records", tables.REPO / "results"
    if not records.is_dir():
        pytest.skip("no committed records")
    render(list(tables.TABLES), records, tmp_path)
    produced = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in results.iterdir() if p.stem in tables.TABLES or p.name == "README.md")
    assert produced == committed
    for name in produced:
        assert (tmp_path / name).read_bytes() == (results / name).read_bytes(), name


# ------------------------------------------------------------------------------------------------ streaming, passkey


def stream_metrics(bucket_nll: list[float], starts=(4, 8), counts=(4, 8)) -> dict:
    return {"nll_sum": sum(bucket_nll), "n_tokens": sum(counts), "ppl": 0.0, "bucket_start": list(starts),
            "bucket_tokens": list(counts), "bucket_nll_sum": bucket_nll}  # fmt: skip


def test_streaming_table_hand_computed(tmp_path):
    kv = {"s0": {"bucket_kv_tokens_mean": [6.0, 10.0]}, "s1": {"bucket_kv_tokens_mean": [6.0, 12.0]}}
    full = {"s0": stream_metrics([4.0, 8.0]), "s1": stream_metrics([8.0, 16.0])}
    win = {"s0": stream_metrics([4.0, 16.0]), "s1": stream_metrics([8.0, 24.0])}
    extra = {"summary_extra": {"model_max_positions": 8}}
    write_run(tmp_path, "wikitext_stream", "full", None, full, fields=kv, **extra)
    write_run(tmp_path, "wikitext_stream", "streaming_llm", 6, win, fields=kv, **extra)
    write_run(tmp_path, "wikitext_stream", "streaming_llm", 6, full, cache_extra={"sink": 2}, **extra)
    write_run(tmp_path, "wikitext_stream", "h2o", 6, win | {"s2": {"nll_sum": 1.0, "n_tokens": 12}}, **extra)
    runs, _ = load_runs(tmp_path)
    t = build_table(Spec.load("streaming"), runs)
    f = t.frame.set_index("policy")
    assert list(f.index) == ["full", "streaming_llm", "h2o", "streaming_llm[sink=2]"]  # the spec's order, then variants
    assert f.loc["full", "ppl@4-8"] == pytest.approx(math.exp(12 / 8))  # token-weighted over the two streams
    assert f.loc["streaming_llm", "ppl@8-16"] == pytest.approx(math.exp(40 / 16))
    assert f.loc["streaming_llm", "ppl"] == pytest.approx(math.exp(52 / 24)) and f.loc["full", "tokens"] == 24
    assert f.loc["streaming_llm[sink=2]", "ppl@8-16"] == pytest.approx(math.exp(24 / 16))
    assert f.loc["full", "kv@8-16"] == 11.0 and math.isnan(f.loc["streaming_llm[sink=2]", "kv@8-16"])
    assert f.loc["h2o", "n"] == 2 and any("1 samples without position buckets" in w for w in t.warnings)
    paths = tables.write_table(t, tmp_path / "out")
    md = paths[0].read_text()
    assert "| policy | budget | n | ppl | KV tokens (mean) | 4–8 | 8–16 † |" in md
    assert "| streaming_llm | 6 | 2 | 8.7 | 50.0 | 4.5 | 12.2 |" in md
    assert paths[2].read_bytes()[:8] == PNG_MAGIC
    assert json.loads(paths[3].read_text())["trained_context"] == 8
    # Without model_max_positions in the records: the spec's map for the model, else none.
    for d in tmp_path.glob("wikitext_stream/m/*"):
        summary = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "model_max_positions"}))
    runs, _ = load_runs(tmp_path)
    assert build_table(Spec.load("streaming"), runs).extra["trained_context"] is None
    spec = Spec.load("streaming")
    spec.trained_context = {"m": 4}
    assert "| 4–8 † | 8–16 † |" in tables.to_markdown(build_table(spec, runs))


def test_passkey_table_hand_computed(tmp_path):
    def rec(length: int, depth: float, hit: float, old: bool = False) -> tuple[dict, dict]:
        metrics = {"accuracy": hit, f"accuracy@{length}": hit, f"accuracy@depth{depth:g}": hit}
        return metrics, ({} if old else {"length": length, "depth": depth})

    grid = {"a": rec(2048, 0.0, 1.0), "b": rec(2048, 0.0, 0.0), "c": rec(2048, 1.0, 1.0), "d": rec(16384, 0.5, 0.0),
            "e": rec(16384, 0.5, 1.0, old=True)}  # "e": a record from before length/depth were fields  # fmt: skip
    samples, fields = {k: v[0] for k, v in grid.items()}, {k: v[1] for k, v in grid.items()}
    write_run(tmp_path, "passkey", "full", None, samples, fields=fields)
    write_run(tmp_path, "passkey", "cascading", 1024, {k: {**m, "accuracy": 0.0} for k, m in samples.items()},
              fields=fields)  # fmt: skip
    runs, _ = load_runs(tmp_path)
    t = build_table(Spec.load("passkey"), runs, model="m")
    f = t.frame.set_index(["policy", "length", "depth"])
    assert f.loc[("full", 2048, 0.0), "accuracy"] == 0.5 and f.loc[("full", 2048, 0.0), "n"] == 2
    assert f.loc[("full", 16384, 0.5), "accuracy"] == 0.5 and f.loc[("full", 16384, 0.5), "n"] == 2
    assert (t.frame.loc[t.frame["policy"] == "cascading", "accuracy"] == 0).all()
    assert list(t.frame["policy"].unique()) == ["full", "cascading"] and t.extra["trained_context"] is None
    paths = tables.write_table(t, tmp_path / "out")
    md = paths[0].read_text()
    assert md.startswith("# Passkey retrieval accuracy by context length and depth (SYNTHETIC prompts)")
    assert "**SYNTHETIC data**" in md and "| policy | budget | n | all | 2k | 16k |" in md
    assert "| full | - | 5 | 0.60 | 0.67 | 0.50 |" in md and "| cascading | 1024 | 5 | 0.00 | 0.00 | 0.00 |" in md
    assert "### full, budget -: accuracy by depth (rows) and length" in md and "| 0.5 | - | 0.50 |" in md
    assert paths[2].read_bytes()[:8] == PNG_MAGIC
    csv = pd.read_csv(paths[1])
    assert list(csv.columns[:8]) == ["model", "task", "policy", "budget", "n", "length", "depth", "accuracy"]
    tables.write_index(tmp_path / "out")
    assert "SYNTHETIC" in (tmp_path / "out" / "README.md").read_text()
    # The model's trained context marks the longer prompts.
    spec = Spec.load("passkey")
    spec.trained_context = {"m": 8192}
    assert "| policy | budget | n | all | 2k | 16k † |" in tables.to_markdown(build_table(spec, runs, model="m"))


def test_policy_entries():
    assert tables.policy_entry("h2o") == ("h2o", {})
    assert tables.policy_entry("streaming_llm[sink=2,positions=in_cache]") == (
        "streaming_llm", {"sink": "2", "positions": "in_cache"}
    )  # fmt: skip
    assert tables.policy_entry({"policy": "buzz", "overrides": {"sink": 8}}) == ("buzz", {"sink": 8})
    assert tables.entry_label("streaming_llm", {"sink": 2, "positions": "in_cache"}) == (
        "streaming_llm[positions=in_cache,sink=2]"
    )  # fmt: skip
    assert tables.split_policies("full,streaming_llm[sink=2,window=3] h2o") == [
        "full", "streaming_llm[sink=2,window=3]", "h2o"
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="invalid"):
        tables.policy_entry("h2o[recent]")
    assert Spec.load("streaming").policy_labels[:3] == ["full", "streaming_llm", "streaming_llm[positions=in_cache]"]


def test_job_commands_with_cache_overrides(tmp_path):
    configs = cache_configs(
        tmp_path, full="budget: null", streaming_llm="budget: 0.5\nsink: 4", h2o="budget: 0.5\nrecent: 0.5"
    )
    spec = Spec.load("streaming")
    in_cache = {"policy": "streaming_llm", "overrides": {"positions": "in_cache"}}
    policies = ["streaming_llm", {"policy": "streaming_llm", "overrides": {"sink": 2}}, "h2o[sink=2]", in_cache,
                "streaming_llm[sink=2]"]  # fmt: skip
    cmds, msgs = job_commands(spec, "tiny-llama", 1, policies, [1024], "/r", configs=configs, python="py")
    assert msgs == [
        "skip policy h2o[sink=2]: sink is not a key of configs/cache/h2o.yaml (yet)",
        "skip policy streaming_llm[positions=in_cache]: positions is not a key of configs/cache/streaming_llm.yaml "
        "(yet)",
    ]  # fmt: skip
    tail = [c[c.index("-m") + 1 :] for c in cmds]
    common = ["model=tiny-llama", "task=wikitext_stream", "limit=1", "logger=none", "output_dir=/r"]
    assert tail == [
        [*common, "cache=streaming_llm", "cache.budget=1024"],
        [*common, "cache=streaming_llm", "cache.sink=2", "cache.budget=1024"],  # one command for both spellings
        [*common, "cache=full"],
    ]


def test_default_streaming_and_passkey_commands(capsys):
    """The run.py command lines `make table-streaming` / `make table-passkey` issue for the default profile. The
    positions=in_cache entries run once configs/cache/<policy>.yaml has the key, and are skipped with a message
    until then."""
    assert tables.main(["run", "streaming", "passkey", "--dry-run"]) == 0
    out = capsys.readouterr().out
    budgeted = "cache=streaming_llm,cascading,h2o,buzz cache.budget=1024"
    assert (
        f"run.py -m model=smollm2-135m task=wikitext_stream limit=1 logger=none output_dir=results/runs {budgeted}"
        in out
    )
    assert (
        "run.py -m model=smollm2-135m task=wikitext_stream limit=1 logger=none output_dir=results/runs cache=full"
        in out
    )
    budgeted = "cache=streaming_llm,h2o,buzz,cascading cache.budget=1024"
    assert f"run.py -m model=smollm2-135m task=passkey limit=null logger=none output_dir=results/runs {budgeted}" in out
    for task, policies in (("wikitext_stream", "streaming_llm,cascading,buzz"), ("passkey", "streaming_llm,cascading")):
        names = [p for p in policies.split(",") if "positions" in (tables.CONFIGS / "cache" / f"{p}.yaml").read_text()]
        if names:
            assert (
                f"task={task} " in out and f"cache={','.join(names)} cache.positions=in_cache cache.budget=1024" in out
            )
        for p in set(policies.split(",")) - set(names):
            assert f"skip policy {p}[positions=in_cache]: positions is not a key of configs/cache/{p}.yaml" in out

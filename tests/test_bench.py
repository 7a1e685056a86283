"""The decode benchmark and its report on CPU with a tiny shape: well-formed outputs, never timings."""

from __future__ import annotations

import json
import math

import pytest

from buzz import bench, perf_report

SUMMARY_KEYS = {"gpu", "shape", "prompt", "batch", "budget", "decode_ms", "roofline_ms", "prefill_ms", "full_oom_point"}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["--shape", "tiny", "--device", "cpu", "--prompts", "48", "--batches", "2", "--decode-steps", "2",
            "--repeats", "1", "--budgets", "0.5", "--out", str(out), "--name", "cpu"]  # fmt: skip
    return bench.main(args), out


def test_grid_points_and_table_are_well_formed(grid):
    result, out = grid
    policies = {"full", "window", "streaming_llm", "h2o", "buzz", "buzz_paper"}
    assert {p["policy"] for p in result["points"]} == policies
    assert all(p["status"] == "ok" and p["decode_ms"] > 0 and p["stored_tokens"] > 0 for p in result["points"])
    stored = {p["policy"]: p["stored_tokens"] for p in result["points"]}
    assert stored["full"] == 48 + 2 + 1 + 2  # prompt + warm-up, capture and timed steps
    assert stored["window"] == 24  # half of the prompt, after each step
    rows = [line for line in (out / "cpu.md").read_text().splitlines() if line.startswith("| 48 |")]
    assert len(rows) == len(result["points"]) and all(line.count("|") == 11 for line in rows)
    points = [json.loads(line) for line in (out / "cpu.points.jsonl").read_text().splitlines()]
    assert len(points) == len(result["points"])  # written as measured


def test_report_summary_has_exactly_the_issue_keys(grid, tmp_path):
    _, out = grid
    perf_report.main(["--grid", str(out / "cpu.json"), "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert {"full", "full_eager", "buzz", "buzz_paper"} <= set(summary["decode_ms"])
    result = json.loads((tmp_path / "cpu.json").read_text())
    here = bench.summarize(result, prompt=48, batch=2, budget=0.5)  # the headline point of this small grid
    (point,) = [p for p in result["points"] if p["policy"] == "buzz"]
    assert here["decode_ms"]["buzz"] == round(point["decode_ms"], 3) and here["prefill_ms"]["buzz_paper"] > 0
    assert (tmp_path / "decode_vs_context.png").stat().st_size > 0


def rows(values):
    return [{"seen": n, "stored_tokens": v, "decode_ms": 1.0} for n, v in values]


def test_growth_fit_tells_linear_log_and_constant_apart():
    ns = range(1024, 33 * 1024, 1024)
    assert bench.fit_growth(rows((n, 3 * n + 7) for n in ns))["stored_tokens"]["best"] == "n"
    assert bench.fit_growth(rows((n, 50 * math.log(n)) for n in ns))["stored_tokens"]["best"] == "log_n"
    sawtooth = bench.fit_growth(rows((n, 258 + (n * 37) % 305) for n in ns))["stored_tokens"]
    assert sawtooth["best"] == "constant" and sawtooth["min"] >= 258 and sawtooth["max"] < 563

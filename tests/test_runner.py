"""End-to-end jobs on tiny-llama: records and their fields, resuming, crash safety, OOM as a status, batching, and
the decoding loops against cache-free references."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import buzz.models
import buzz.runner
import buzz.tasks.base
from buzz.cache import make_cache
from buzz.records import RunRecords
from buzz.runner import ConfigError, generate_greedy, run, stream_nll
from tests.conftest import DATA_DIR, PYTHON, REPO, TASKS, compose_cfg, needs_data, subprocess_env, tiny_overrides

SAMPLE_KEYS = {
    "id", "prompt_tokens", "metrics", "kv_tokens_after_prefill", "kv_tokens_peak", "kv_tokens_mean", "kv_bytes_peak",
    "kv_bytes_full", "prefill_ms", "decode_ms_per_step", "batch_tokens_per_s", "batch_size",
}  # fmt: skip
SUMMARY_KEYS = {
    "status", "error", "run_dir", "n", "task", "model", "cache", "budget", "metrics", "metric_info", "data",
    "kv_tokens_peak", "kv_tokens_mean", "kv_bytes_peak_mean", "kv_bytes_full_mean", "kv_ratio_vs_full", "prefill_ms",
    "decode_ms_per_token", "tokens_per_s", "batch_size", "config", "environment", "peak_memory_bytes",
    "peak_memory_kind",
}  # fmt: skip
METRICS = {
    "xsum": {"rouge1", "rouge2", "rougeL", "rougeLsum"},
    "cnn_dm": {"rouge1", "rouge2", "rougeL", "rougeLsum"},
    "qa10": {"accuracy"},
    "wikitext": {"nll_sum", "n_tokens", "ppl"},
}
WINDOW = 16  # tokens: below every prompt length here


def job(tmp_path: Path, task: str = "xsum", *extra: str, limit: int = 2) -> dict:
    return run(compose_cfg(tiny_overrides(tmp_path, task, *extra, limit=limit)))


def read_samples(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "samples.jsonl").read_text().splitlines()]


@pytest.fixture
def count_calls(monkeypatch):
    """Wraps the decoding functions; the returned list gets one entry per decoded sample."""
    calls: list[int] = []
    gen, nll = buzz.runner.generate_greedy, buzz.runner.stream_nll

    def counted_gen(model, prompts, *a, **k):
        calls.extend(len(p) for p in prompts)
        return gen(model, prompts, *a, **k)

    def counted_nll(model, streams, *a, **k):
        calls.extend([streams.shape[1]] * streams.shape[0])
        return nll(model, streams, *a, **k)

    monkeypatch.setattr(buzz.runner, "generate_greedy", counted_gen)
    monkeypatch.setattr(buzz.runner, "stream_nll", counted_nll)
    return calls


# ------------------------------------------------------------------------------------------------ end to end


@needs_data
@pytest.mark.parametrize("cache", ["full", "window"])
@pytest.mark.parametrize("task", TASKS)
def test_job_writes_records(task, cache, tmp_path):
    extra = [f"cache={cache}"] + ([f"cache.budget={WINDOW}"] if cache == "window" else [])
    summary = job(tmp_path, task, *extra)
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == tmp_path / task / "tiny-llama"
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary, default=str))
    assert json.loads((run_dir / "config.json").read_text())["limit"] == 2

    recs = read_samples(run_dir)
    assert len(recs) == 2 and len({r["id"] for r in recs}) == 2
    for r in recs:
        assert SAMPLE_KEYS <= r.keys()
        assert set(r["metrics"]) == METRICS[task]
        assert r["kv_bytes_peak"] > 0 and r["prefill_ms"] > 0
        if task == "wikitext":
            assert r["prompt_tokens"] == 48 and r["metrics"]["n_tokens"] == 48 - 16
            assert 1 < r["metrics"]["ppl"] < math.inf
            fed = 48 - 1  # the last token is only scored
            prefill = 16
        else:
            assert isinstance(r["prediction"], str) and 1 <= r["new_tokens"] <= 4
            assert r["reference"]
            assert all(0 <= v <= 1 for v in r["metrics"].values())
            fed = r["prompt_tokens"] + r["new_tokens"] - 1  # the last new token is never fed
            prefill = r["prompt_tokens"]
        if cache == "full":
            assert (r["kv_tokens_after_prefill"], r["kv_tokens_peak"]) == (prefill, fed)
            assert r["kv_bytes_peak"] == r["kv_bytes_full"]
        else:
            assert r["kv_tokens_after_prefill"] == r["kv_tokens_peak"] == WINDOW
            assert r["kv_bytes_peak"] * fed == r["kv_bytes_full"] * WINDOW

    assert SUMMARY_KEYS <= summary.keys()
    assert summary["status"] == "done" and summary["error"] is None and summary["n"] == 2
    assert (summary["task"], summary["model"], summary["cache"]) == (task, "tiny-llama", cache)
    assert summary["budget"] == (WINDOW if cache == "window" else None)
    assert summary["metrics"]["n"] == 2
    if task == "wikitext":
        nll = sum(r["metrics"]["nll_sum"] for r in recs)
        assert summary["metrics"]["ppl"] == pytest.approx(math.exp(nll / (2 * 32)))
    else:
        for key in METRICS[task]:
            assert summary["metrics"][key] == pytest.approx(sum(r["metrics"][key] for r in recs) / 2)
    assert summary["data"]["origin"] == "offline" and summary["data"]["synthetic"] == (task == "qa10")
    if cache == "full":
        assert summary["kv_ratio_vs_full"] == pytest.approx(1.0)
    else:
        assert 0 < summary["kv_ratio_vs_full"] < 1
    assert summary["peak_memory_bytes"] > 0 and summary["environment"]["packages"]["torch"]
    assert summary["config"]["cache"]["name"] == cache


@needs_data
def test_run_py_end_to_end(tmp_path):
    args = tiny_overrides(tmp_path, "qa10", "cache=streaming_llm", "cache.budget=24")
    proc = subprocess.run(
        [PYTHON, "run.py", *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== qa10 x tiny-llama x streaming_llm (budget 24): done, n=2" in proc.stdout
    assert "SYNTHETIC" in proc.stdout
    (summary_path,) = tmp_path.glob("qa10/tiny-llama/streaming_llm-b24-*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "done" and summary["n"] == 2 and summary["data"]["synthetic"] is True
    assert len(read_samples(summary_path.parent)) == 2
    assert list((tmp_path / ".hydra").iterdir())  # Hydra's own logs stay under output_dir


# ------------------------------------------------------------------------------------------------ resuming


@needs_data
def test_resume_computes_only_new_samples(tmp_path, count_calls, monkeypatch):
    first = job(tmp_path, "xsum", "batch_size=1", limit=2)
    assert len(count_calls) == 2
    before = (Path(first["run_dir"]) / "samples.jsonl").read_text().splitlines()
    peak = first["peak_memory_bytes"]

    second = job(tmp_path, "xsum", "batch_size=3", limit=4)  # batch size is not part of the run's identity
    assert second["run_dir"] == first["run_dir"]
    assert len(count_calls) == 4  # only the 2 new samples were decoded
    after = (Path(second["run_dir"]) / "samples.jsonl").read_text().splitlines()
    assert after[:2] == before and len(after) == 4
    assert second["n"] == 4 and second["metrics"]["n"] == 4

    # Everything done: no model is loaded, the summary covers `limit` samples and keeps the measured peak memory.
    def boom(*args, **kwargs):
        raise AssertionError("model loaded for a finished job")

    monkeypatch.setattr(buzz.models, "load_model", boom)
    third = job(tmp_path, "xsum", limit=2)
    assert len(count_calls) == 4 and third["n"] == 2 and third["status"] == "done"
    assert third["metrics"] == first["metrics"]
    assert third["peak_memory_bytes"] is not None and third["peak_memory_bytes"] >= peak
    assert (Path(third["run_dir"]) / "samples.jsonl").read_text().splitlines() == after


@needs_data
def test_result_changing_settings_get_their_own_run(tmp_path, count_calls):
    a = job(tmp_path, "xsum")
    b = job(tmp_path, "xsum", "task.max_new_tokens=3")
    c = job(tmp_path, "xsum", "cache=window", "cache.budget=8")
    assert len({a["run_dir"], b["run_dir"], c["run_dir"]}) == 3
    assert len(count_calls) == 6


KILLABLE = """
import runpy, sys, time
import buzz.runner as runner
decode, calls = runner.generate_greedy, []
def slow(*args, **kwargs):  # the second batch hangs: the test kills the process there
    calls.append(1)
    if len(calls) > 1:
        time.sleep(600)
    return decode(*args, **kwargs)
runner.generate_greedy = slow
sys.argv = ["run.py", *sys.argv[1:]]
runpy.run_path("run.py", run_name="__main__")
"""


@needs_data
def test_kill_9_then_resume(tmp_path, count_calls):
    args = tiny_overrides(tmp_path, "xsum", "batch_size=1", limit=3)
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(
        [PYTHON, "-c", KILLABLE, *args], cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=log
    )
    try:
        deadline = time.monotonic() + 240
        while not any(p.read_bytes().count(b"\n") >= 1 for p in tmp_path.rglob("samples.jsonl")):
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
            assert time.monotonic() < deadline, "no sample written in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    (path,) = tmp_path.rglob("samples.jsonl")
    assert not (path.parent / "summary.json").exists()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    # A kill in the middle of a write leaves a torn last line: it must be ignored and overwritten.
    with path.open("a") as f:
        f.write('{"id": "torn", "prompt_tok')

    summary = job(tmp_path, "xsum", limit=3)
    assert summary["run_dir"] == str(path.parent)
    assert len(count_calls) == 2  # the killed sample and the one after it
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) == 3 and len({r["id"] for r in recs}) == 3
    assert path.read_text().splitlines()[0] == lines[0]
    assert summary["status"] == "done" and summary["n"] == 3


def test_records_torn_tail(tmp_path):
    records = RunRecords(tmp_path / "run")
    assert records.samples() == {} and records.summary() is None
    records.append({"id": "a", "x": 1})
    records.append({"id": "b", "x": "é"})
    with records.samples_path.open("ab") as f:
        f.write(b'{"id": "c", "x"')
    assert list(records.samples()) == ["a", "b"]
    records.append({"id": "c", "x": 3})
    assert records.samples_path.read_bytes().count(b"\n") == 3
    assert records.samples() == {"a": {"id": "a", "x": 1}, "b": {"id": "b", "x": "é"}, "c": {"id": "c", "x": 3}}
    records.write_json("summary.json", {"n": 3})
    assert records.summary() == {"n": 3} and not list(records.dir.glob("*.tmp"))


# ------------------------------------------------------------------------------------------------ OOM


def oom_on_call(original, n: int):
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) >= n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nSee the documentation")
        return original(*args, **kwargs)

    return fake


@needs_data
def test_oom_is_recorded_as_a_status(tmp_path, monkeypatch):
    monkeypatch.setattr(buzz.runner, "generate_greedy", oom_on_call(generate_greedy, 2))
    summary = job(tmp_path, "qa10", "batch_size=1", limit=3)
    assert summary["status"] == "oom"
    assert summary["error"] == "CUDA out of memory. Tried to allocate 20.00 GiB"
    assert summary["n"] == 1 and summary["metrics"]["n"] == 1
    saved = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert saved["status"] == "oom" and saved["n"] == 1
    assert len(read_samples(summary["run_dir"])) == 1

    monkeypatch.undo()  # the memory is there now: the rerun finishes the job
    summary = job(tmp_path, "qa10", "batch_size=1", limit=3)
    assert summary["status"] == "done" and summary["error"] is None and summary["n"] == 3


@needs_data
def test_oom_on_the_first_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(buzz.runner, "generate_greedy", oom_on_call(generate_greedy, 1))
    summary = job(tmp_path, "qa10")
    assert summary["status"] == "oom" and summary["n"] == 0 and summary["metrics"] == {}
    assert summary["kv_ratio_vs_full"] is None and summary["peak_memory_bytes"] > 0
    assert json.loads((Path(summary["run_dir"]) / "summary.json").read_text())["status"] == "oom"
    assert not (Path(summary["run_dir"]) / "samples.jsonl").exists()


# ------------------------------------------------------------------------------------------------ batching


@needs_data
@pytest.mark.parametrize(
    ("task", "extra"),
    [
        ("xsum", ["task.max_prompt_tokens=160"]),
        ("qa10", ["cache=h2o", "cache.budget=64"]),
        ("xsum", ["cache=window", "cache.budget=0.5", "task.max_prompt_tokens=400"]),  # a budget per prompt length
    ],
)
def test_batched_equals_one_by_one(task, extra, tmp_path):
    extra = [*extra, "task.max_new_tokens=6"]
    one = read_samples(job(tmp_path / "b1", task, "batch_size=1", *extra, limit=4)["run_dir"])
    four = read_samples(job(tmp_path / "b4", task, "batch_size=4", *extra, limit=4)["run_dir"])
    assert len({r["prompt_tokens"] for r in one}) > 1  # prompts of different lengths: left padding is exercised
    assert {r["batch_size"] for r in four} == {4}
    keys = ["id", "prompt_tokens", "prediction", "new_tokens", "metrics", "kv_tokens_after_prefill", "kv_tokens_peak"]
    assert [[r[k] for k in keys] for r in one] == [[r[k] for k in keys] for r in four]


@needs_data
def test_batched_perplexity_equals_one_by_one(tmp_path):
    one = read_samples(job(tmp_path / "b1", "wikitext", "batch_size=1", "cache=h2o")["run_dir"])
    two = read_samples(job(tmp_path / "b2", "wikitext", "batch_size=2", "cache=h2o")["run_dir"])
    for a, b in zip(one, two, strict=True):
        assert a["id"] == b["id"] and a["kv_tokens_peak"] == b["kv_tokens_peak"]
        assert a["metrics"]["nll_sum"] == pytest.approx(b["metrics"]["nll_sum"], rel=1e-5)


# ------------------------------------------------------------------------------------------------ data origin


def test_missing_data_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="set data_dir") as err:
        job(tmp_path, "xsum", f"data_dir={tmp_path}")
    assert "\n" not in str(err.value) and str(tmp_path / "xsum" / "test.jsonl") in str(err.value)
    assert not list(tmp_path.rglob("samples.jsonl"))


@needs_data
def test_hub_data_runs_apart_from_offline_data(tmp_path, monkeypatch):
    offline = job(tmp_path, "xsum")
    rows = [{"id": f"hub-{i}", "document": f"Hub document number {i}.", "summary": "A summary."} for i in range(3)]
    monkeypatch.setattr(buzz.tasks.base, "load_hub_rows", lambda path, name, split: rows)
    hub = job(tmp_path, "xsum", "data_dir=hub")
    assert hub["run_dir"] != offline["run_dir"]
    assert hub["data"]["origin"] == "hub" and hub["data"]["location"] == "EdinburghNLP/xsum:None:test"
    assert [r["id"] for r in read_samples(hub["run_dir"])] == ["hub-0", "hub-1"]


@needs_data
def test_real_qa10_file_does_not_resume_synthetic_results(tmp_path, count_calls):
    synthetic = job(tmp_path, "qa10", "task.gold_position=0")
    real_dir = tmp_path / "data" / "nq_open_10docs"
    real_dir.mkdir(parents=True)
    src = DATA_DIR / "nq_open_10docs/synthetic_fallback/nq-open-10_total_documents_gold_at_0.SYNTHETIC.jsonl.gz"
    (real_dir / "nq-open-10_total_documents_gold_at_0.jsonl.gz").write_bytes(src.read_bytes())
    real = job(tmp_path, "qa10", "task.gold_position=0", f"data_dir={tmp_path / 'data'}")
    assert synthetic["data"]["synthetic"] is True and real["data"]["synthetic"] is False
    assert real["run_dir"] != synthetic["run_dir"]
    assert len(count_calls) == 4


# ------------------------------------------------------------------------------------------------ decoding loops


@pytest.fixture(scope="module")
def small_model():
    cfg = OmegaConf.to_container(compose_cfg(["model=tiny-llama"]).model, resolve=True)
    return buzz.models.tiny_llama(cfg, vocab_size=256).eval()


def test_generate_greedy_matches_cache_free_argmax(small_model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 255, (n,), generator=g).tolist() for n in (5, 12, 9)]
    cache = make_cache("full", small_model)
    outs = generate_greedy(small_model, prompts, cache, max_new_tokens=6, eos_ids={255}, pad_id=0)
    for prompt, out in zip(prompts, outs):
        new = out["new_tokens"]
        assert 1 <= len(new) <= 6
        assert out["stored_trace"] == list(range(len(prompt), len(prompt) + len(new)))
        with torch.no_grad():  # one forward over prompt + generated tokens, no cache, no padding
            logits = small_model(torch.tensor([prompt + new]), use_cache=False).logits[0]
        for j, token in enumerate(new):
            step = logits[len(prompt) - 1 + j]
            assert step[token] >= step.max() - 1e-4, (j, token, int(step.argmax()))


def test_stream_nll_matches_one_forward(small_model):
    streams = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    outs = stream_nll(small_model, streams, 8, make_cache("full", small_model))
    with torch.no_grad():
        logits = small_model(streams, use_cache=False).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, 7:39].reshape(-1, 256), streams[:, 8:40].reshape(-1), reduction="none"
    ).view(2, 32)
    for out, ref in zip(outs, expected.sum(-1)):
        assert out["n_tokens"] == 32
        assert out["nll_sum"] == pytest.approx(float(ref), rel=1e-5)
        assert out["stored_trace"] == list(range(8, 40))


def test_trace_of_a_sample_that_stops_early_ignores_the_rest_of_the_batch(small_model):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 255, (n,), generator=g).tolist() for n in (7, 11, 4)]
    free = generate_greedy(small_model, prompts, make_cache("full", small_model), 8, eos_ids={255}, pad_id=0)
    eos = free[0]["new_tokens"][1]  # sample 0 stops at its second token; the others run on
    outs = generate_greedy(small_model, prompts, make_cache("full", small_model), 8, eos_ids={eos}, pad_id=0)
    assert len(outs[0]["new_tokens"]) == 2 and max(len(o["new_tokens"]) for o in outs) > 2
    for prompt, out in zip(prompts, outs):
        # One entry per forward the sample needed: the prompt, then each new token but the last.
        assert out["stored_trace"] == list(range(len(prompt), len(prompt) + len(out["new_tokens"])))
        alone = generate_greedy(small_model, [prompt], make_cache("full", small_model), 8, eos_ids={eos}, pad_id=0)
        assert alone[0]["new_tokens"] == out["new_tokens"] and alone[0]["stored_trace"] == out["stored_trace"]


@needs_data
def test_logger_failure_never_stops_a_run(tmp_path, monkeypatch, capsys):
    import wandb

    def fails(*args, **kwargs):
        raise RuntimeError("no network\nmore")

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "init", fails)
    summary = job(tmp_path, "qa10", "logger=wandb", "logger.mode=offline")
    assert summary["status"] == "done" and summary["n"] == 2
    assert "wandb init failed (no network): records stay local" in capsys.readouterr().err


def test_records_take_the_commit_they_are_told(monkeypatch):
    """A checkout copied to a GPU node may carry no .git or a stale one: KVBENCH_GIT_COMMIT wins."""
    from buzz.records import environment

    monkeypatch.setenv("KVBENCH_GIT_COMMIT", "0123abc")
    assert environment()["git_commit"] == "0123abc"

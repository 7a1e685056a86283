"""Streaming perplexity (task=wikitext_stream, or task.bucket_tokens): per-bucket NLL sums that add up to the
total, the bucketless path unchanged, no host syncs per step, and a tiny-llama job whose records carry the buckets
without a per-step trace."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import buzz.models
from buzz.cache import make_cache
from buzz.runner import run, stream_buckets, stream_nll
from buzz.tasks import build_task
from tests.conftest import compose_cfg, needs_data, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

# Tensor-to-host conversions reachable from Python; C++-internal syncs (nonzero, boolean masks) are not counted.
HOST = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
STREAM = ["task.stream_tokens=96", "task.prefix_tokens=16", "task.max_tokens=192", "task.bucket_tokens=32"]


@pytest.fixture(scope="module")
def small_model():
    cfg = OmegaConf.to_container(compose_cfg(["model=tiny-llama"]).model, resolve=True)
    return buzz.models.tiny_llama(cfg, vocab_size=256).eval()


def streams(n: int, b: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (b, n), generator=torch.Generator().manual_seed(seed))


def test_stream_buckets():
    assert stream_buckets(65536, 64, 4096)[:2] == [(64, 4096), (4096, 8192)]
    assert len(stream_buckets(65536, 64, 4096)) == 16 and stream_buckets(65536, 64, 4096)[-1] == (61440, 65536)
    assert stream_buckets(40, 8, None) == stream_buckets(40, 8, 40) == [(8, 40)]
    assert stream_buckets(40, 8, 16) == [(8, 16), (16, 32), (32, 40)]  # a short last bucket
    assert stream_buckets(40, 20, 8) == [(20, 24), (24, 32), (32, 40)]  # buckets inside the prefix are dropped


@pytest.mark.parametrize(
    ("policy", "params"), [("full", {}), ("streaming_llm", {"budget": 12}), ("h2o", {"budget": 12})]
)
def test_bucket_sums_add_up_to_the_total(small_model, policy, params):
    plain = stream_nll(small_model, streams(40), 8, make_cache(policy, small_model, **params))
    outs = stream_nll(small_model, streams(40), 8, make_cache(policy, small_model, **params), bucket_tokens=16)
    for old, out in zip(plain, outs):
        assert out["nll_sum"] == old["nll_sum"] and out["stored_trace"] == old["stored_trace"]  # the same run
        b = out["buckets"]
        assert b["bucket_start"] == [8, 16, 32] and b["bucket_tokens"] == [8, 16, 8]
        assert sum(b["bucket_tokens"]) == out["n_tokens"] == 32
        assert math.fsum(b["bucket_nll_sum"]) == pytest.approx(out["nll_sum"], rel=1e-12)
        # Stored tokens while scoring each bucket's tokens: the trace entry of each scored position, averaged.
        trace = out["stored_trace"]
        assert out["bucket_kv_tokens_mean"] == [
            sum(trace[a - 8 : e - 8]) / (e - a) for a, e in [(8, 16), (16, 32), (32, 40)]
        ]
    assert "buckets" not in plain[0] and "bucket_kv_tokens_mean" not in plain[0]


@pytest.mark.parametrize("chunk", [8, 13, 2048])
def test_full_cache_scored_in_chunks_equals_one_token_at_a_time(small_model, monkeypatch, chunk):
    """The full cache never evicts, so stream_nll scores it in chunks of causal forwards; a window larger than the
    stream never evicts either but goes one token at a time: the same numbers."""
    import buzz.runner as runner

    monkeypatch.setattr(runner, "FULL_STREAM_CHUNK", chunk)
    chunked = stream_nll(small_model, streams(40), 8, make_cache("full", small_model), bucket_tokens=16)
    stepped = stream_nll(small_model, streams(40), 8, make_cache("window", small_model, budget=1000), bucket_tokens=16)
    for c, s in zip(chunked, stepped):
        assert c["nll_sum"] == pytest.approx(s["nll_sum"], rel=1e-5) and c["n_tokens"] == s["n_tokens"] == 32
        assert c["buckets"]["bucket_nll_sum"] == pytest.approx(s["buckets"]["bucket_nll_sum"], rel=1e-5)
        assert c["stored_trace"] == s["stored_trace"]
        assert c["bucket_kv_tokens_mean"] == s["bucket_kv_tokens_mean"]


def test_one_bucket_of_the_whole_stream_equals_the_plain_path(small_model):
    plain = stream_nll(small_model, streams(40), 8, make_cache("streaming_llm", small_model, budget=12))
    one = stream_nll(small_model, streams(40), 8, make_cache("streaming_llm", small_model, budget=12), bucket_tokens=40)
    for old, out in zip(plain, one):
        assert out["buckets"]["bucket_nll_sum"] == [old["nll_sum"]]  # bit for bit: the same float64 additions
        assert out["buckets"]["bucket_tokens"] == [old["n_tokens"]] and out["buckets"]["bucket_start"] == [8]
    task = build_task({"name": "wikitext", "bucket_tokens": 40})
    m = task.score_stream(one[0]["nll_sum"], one[0]["n_tokens"], one[0]["buckets"])
    assert m["bucket_ppl"] == [m["ppl"]] == [math.exp(plain[0]["nll_sum"] / 32)]


@pytest.mark.parametrize(
    ("policy", "params"), [("full", {}), ("streaming_llm", {"budget": 12}), ("buzz", {"budget": 16})]
)
def test_no_host_conversion_per_step(small_model, monkeypatch, policy, params):
    """Host conversions in stream_nll (eager decoding, graphs=False on CPU) do not grow with the stream: none per
    step, with buckets on."""

    def count(n: int) -> collections.Counter:
        calls: collections.Counter = collections.Counter()
        with monkeypatch.context() as mp:
            for name in HOST:
                orig = getattr(torch.Tensor, name)

                def counted(self, *a, _orig=orig, _name=name, **k):
                    calls[_name] += 1
                    return _orig(self, *a, **k)

                mp.setattr(torch.Tensor, name, counted)
            stream_nll(
                small_model, streams(n), 8, make_cache(policy, small_model, **params), graphs=False, bucket_tokens=8
            )
        return calls

    short, long = count(24), count(56)
    assert short == long, (short, long)


def test_task_config():
    t = build_task({"name": "wikitext_stream"})
    assert (t.stream_tokens, t.prefix_tokens, t.bucket_tokens, t.cfg["max_tokens"]) == (32768, 64, 4096, 32768)
    assert build_task({"name": "wikitext"}).bucket_tokens is None
    with pytest.raises(ValueError, match=r"task.bucket_tokens=0 is invalid; allowed: an int >= 1 or null"):
        build_task({"name": "wikitext_stream", "bucket_tokens": 0})
    buckets = {"bucket_start": [4, 8], "bucket_tokens": [4, 16]}
    per_sample = [
        {"nll_sum": 30.0, "n_tokens": 20, "bucket_nll_sum": [10.0, 20.0], **buckets},
        {"nll_sum": 50.0, "n_tokens": 20, "bucket_nll_sum": [14.0, 36.0], **buckets},
    ]
    agg = t.aggregate(per_sample)
    assert agg["ppl"] == pytest.approx(math.exp(2.0)) and agg["bucket_start"] == [4, 8]
    assert agg["bucket_ppl"] == pytest.approx([math.exp(3.0), math.exp(56 / 32)])


@needs_data
def test_tiny_llama_stream_job(tmp_path):
    cfg = compose_cfg(tiny_overrides(tmp_path, "wikitext", "task=wikitext_stream", *STREAM, "cache=streaming_llm",
                                     "cache.budget=24"))  # fmt: skip
    summary = run(cfg)
    assert summary["status"] == "done" and summary["n"] == 2 and summary["model_max_positions"] == 8192
    assert summary["batch_size"] == 2 and cfg.batch_size == 8  # the batch that ran: both streams, not the config's
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == tmp_path / "wikitext_stream" / "tiny-llama"
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    for line in lines:
        rec = json.loads(line)
        m = rec["metrics"]
        assert m["bucket_start"] == [16, 32, 64] and m["bucket_tokens"] == [16, 32, 32] and m["n_tokens"] == 80
        assert math.fsum(m["bucket_nll_sum"]) == pytest.approx(m["nll_sum"], rel=1e-12)
        assert m["bucket_ppl"] == [math.exp(s / k) for s, k in zip(m["bucket_nll_sum"], m["bucket_tokens"])]
        # Stored tokens: the prefill's 16, one more per step up to the budget (24), then the budget.
        assert rec["bucket_kv_tokens_mean"] == [(sum(range(16, 24)) + 8 * 24) / 16, 24.0, 24.0]
        assert (rec["kv_tokens_after_prefill"], rec["kv_tokens_peak"]) == (16, 24)
        assert rec["kv_tokens_mean"] == pytest.approx((sum(range(17, 24)) + 24 * (79 - 7)) / 79)  # after each step
        assert "stored_trace" not in rec and len(line) < 2000  # summarised, never one entry per step
    assert summary["metrics"]["bucket_start"] == [16, 32, 64] and len(summary["metrics"]["bucket_ppl"]) == 3
    # The same stream through task=wikitext with the key added by hand: the same numbers.
    plain = run(compose_cfg(tiny_overrides(tmp_path, "wikitext", *STREAM[:3], "+task.bucket_tokens=32",
                                           "cache=streaming_llm", "cache.budget=24")))  # fmt: skip
    assert plain["metrics"]["bucket_ppl"] == summary["metrics"]["bucket_ppl"]

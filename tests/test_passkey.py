"""The synthetic passkey task: prompt lengths and key depth in the model's tokens, scoring, labelling as synthetic,
and one tiny-llama job end to end through the cascading cache (with a strided prefill)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from buzz.models import load_tokenizer
from buzz.runner import run
from buzz.tasks import build_task
from buzz.tasks.passkey import INTRO, KEY_LINE, QUESTION, Passkey
from tests.conftest import compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def task(**cfg) -> Passkey:
    return build_task({"name": "passkey", **cfg})


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(OmegaConf.to_container(compose_cfg(["model=tiny-llama"]).model))


def test_prompts_have_the_requested_length_and_depth(tokenizer):
    t = task(lengths=[128, 700, 4096], depths=[0.0, 0.3, 1.0], samples=1)
    samples, _ = t.load(None, None)
    assert len(samples) == 9
    for s in samples:
        ids, before, after = t.fit(s, tokenizer)
        length, depth = s.meta["length"], s.meta["depth"]
        assert abs(len(ids) - length) <= 0.05 * length, (s.id, len(ids))
        assert ids == t.encode(s, tokenizer)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        key_line = KEY_LINE.format(key=s.reference["passkey"])
        assert text.count(key_line) == 1 and text.count(s.reference["passkey"]) == 2
        # the key sits after `depth` of the filler, counted in filler sentences and in tokens
        assert abs(before / (before + after) - depth) <= 1 / (before + after)
        head, tail = text.split(key_line)
        n_before = len(tokenizer(head[len(INTRO) :], add_special_tokens=False)["input_ids"])
        n_after = len(tokenizer(tail[: tail.rindex(QUESTION)], add_special_tokens=False)["input_ids"])
        assert abs(n_before / (n_before + n_after) - depth) <= 0.05, (s.id, n_before, n_after)


def test_keys_are_seeded_five_digit_and_samples_synthetic():
    a, src = task(lengths=[256, 512], depths=[0.5], samples=3).load(None, None)
    b, _ = task(lengths=[256, 512], depths=[0.5], samples=3).load(None, None)
    c, _ = task(lengths=[256, 512], depths=[0.5], samples=3, seed=1).load(None, None)
    keys = [s.reference["passkey"] for s in a]
    assert keys == [s.reference["passkey"] for s in b] != [s.reference["passkey"] for s in c]
    assert all(len(k) == 5 and k.isdigit() for k in keys) and len(set(keys)) == len(keys)
    assert len({s.id for s in a}) == len(a) == 6
    assert src.synthetic and "SYNTHETIC" in src.note and all(s.reference["synthetic"] for s in a)
    assert len(task(lengths=[256, 512], samples=3).load(None, 4)[0]) == 4


def test_scoring():
    t = task(lengths=[256], depths=[0.25], samples=1)
    (s,), _ = t.load(None, None)
    key = s.reference["passkey"]
    assert t.score(s, f" {key}. Remember it.")["accuracy"] == 1.0
    assert t.score(s, f"the key is {key}")["accuracy@256"] == 1.0
    assert t.score(s, f"{key}7")["accuracy"] == 0.0  # part of a longer number
    assert t.score(s, key[:4])["accuracy"] == 0.0
    assert t.score(s, "12 345")["accuracy"] == 0.0
    agg = t.aggregate([{"accuracy": 1.0, "accuracy@256": 1.0}, {"accuracy": 0.0, "accuracy@512": 0.0}])
    assert agg == {"accuracy": 0.5, "accuracy@256": 1.0, "accuracy@512": 0.0, "n": 2}


@pytest.mark.parametrize(
    "key,bad", [("lengths", [10]), ("lengths", "x"), ("depths", [1.5]), ("samples", 0), ("seed", "a")]
)
def test_bad_config_is_one_line_error(key, bad):
    with pytest.raises(ValueError, match=rf"task.{key}=.* is invalid; allowed") as e:
        task(**{key: bad})
    assert "\n" not in str(e.value)


def test_tiny_llama_job_with_cascading_cache(tmp_path):
    overrides = [
        "model=tiny-llama", "logger=none", "task=passkey", "task.lengths=[256]", "limit=2", "cache=cascading",
        "cache.budget=64", "cache.prefill_stride=96", f"output_dir={tmp_path}", "progress=false",
    ]  # fmt: skip
    summary = run(compose_cfg(overrides))
    assert summary["status"] == "done" and summary["n"] == 2
    assert summary["data"]["synthetic"] is True and summary["data"]["origin"] == "generated"
    assert set(summary["metrics"]) >= {"accuracy", "accuracy@256", "n"}
    records = [json.loads(line) for line in (tmp_path.glob("passkey/*/*/samples.jsonl").__next__()).open()]
    assert len(records) == 2
    for rec in records:
        assert rec["reference"]["synthetic"] is True
        assert (rec["length"], rec["depth"]) == (256, 0.0)  # the passkey table's axes, kept when references are not
        assert abs(rec["prompt_tokens"] - 256) <= 13
        assert rec["kv_tokens_peak"] <= 64 and rec["kv_tokens_after_prefill"] == 64

"""The cascading policy against an independent plain-Python transcription of the paper's cascade, token by token,
through the masked-attention reference (tests/reference.py), with one-token, strided and one-shot prefills."""

from __future__ import annotations

import pytest
import torch

import buzz
from buzz.runner import prefill_forwards
from tests.reference import reference_logits
from tests.test_policies import greedy, streaming_rule

pytestmark = pytest.mark.usefixtures("one_thread")

N_PROMPT, N_DECODE = 24, 40


class CascadeRule:
    """The cascade of the reference code (`_update_kv_cache_inner` in jeffwillette/cascading_kv_cache), one token
    at a time, on Python lists per layer and KV head. `reference_logits` calls a rule once per layer and head, in
    that order, after each forward; the call count says which head is being served."""

    def __init__(self, n_heads: int, budget: int, sink: int, cascades: int, schedule: str, decay: float):
        self.sink = min(sink, budget)
        m = budget - self.sink
        self.m = m
        self.sizes = [m // cascades + (1 if i < m % cascades else 0) for i in range(cascades)]
        self.every = [2**i if schedule == "pow2" else 1 for i in range(cascades)]
        self.decay = decay
        self.calls = 0
        self.heads = [
            {"seen": 0, "sinks": [], "subs": [[] for _ in range(cascades)], "ema": {}, "sum": {}}
            for _ in range(n_heads)
        ]

    def __call__(self, stored: set[int], scores: dict[int, float], seen: int) -> set[int]:
        st = self.heads[self.calls % len(self.heads)]
        self.calls += 1
        new = list(range(st["seen"], seen))
        st["seen"] = seen
        ema, total = st["ema"], st["sum"]
        for p in stored:  # the attention received in this forward = growth of the running sum
            got = scores.get(p, 0.0) - total.get(p, 0.0)
            ema[p] = self.decay ** len(new) * ema.get(p, 0.0) + got
            total[p] = scores.get(p, 0.0)
        for p in new:
            self.offer(st, p, ema)
        return set(st["sinks"]).union(*st["subs"])

    def offer(self, st: dict, p: int, ema: dict[int, float]) -> None:
        t = p - self.sink
        if t < 0:
            st["sinks"].append(p)
            return
        x = p
        for i, sub in enumerate(st["subs"]):
            if self.sizes[i] == 0:
                return  # empty sub-caches (budget - sinks < cascades): the token is evicted
            if t <= self.m or t % self.every[i] == 0:  # eager fill, or this sub-cache's turn
                if len(sub) < self.sizes[i]:
                    sub.append(x)
                    return
                oldest = sub.pop(0)
                sub.append(x)
                x = oldest
            else:
                if not sub:
                    sub.append(x)
                elif ema[x] >= ema[sub[-1]]:
                    sub[-1] = x
                return


def right_aligned(n: int, stride: int) -> list[int]:
    """The runner's prefill chunks: `stride` tokens each, the first one shorter, the last ending at the prompt's end."""
    first = n % stride or stride
    return [first] + [stride] * ((n - first) // stride)


def cache_logits(model, ids: list[int], n_prompt: int, cache, trace: list) -> torch.Tensor:
    """Prefill through the runner (strided when the policy says so), then teacher-forced one token at a time; the
    logits of each forward's last token, and the stored tokens after each forward."""
    out = []
    with torch.no_grad():
        x = torch.tensor([ids[:n_prompt]])
        for logits in prefill_forwards(model, cache, "past_key_values", x, torch.ones_like(x), None):
            out.append(logits[0, -1])
            trace.append(int(cache.stored_tokens()[0]))
        for t in range(n_prompt, len(ids)):
            out.append(model(torch.tensor([[ids[t]]]), past_key_values=cache).logits[0, -1])
            trace.append(int(cache.stored_tokens()[0]))
    return torch.stack(out)


@pytest.fixture(scope="module")
def sharp_model():
    """The tiny Llama with its queries scaled up: peaked attention, so a group's query heads disagree (on the plain
    tiny model they attend almost alike, and max over heads makes the same decisions as their sum)."""
    from tests.reference import tiny_llama

    m = tiny_llama()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    return m


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 97, (N_PROMPT + N_DECODE,), generator=g).tolist()


def rule_for(model, params: dict) -> CascadeRule:
    cfg = model.config
    return CascadeRule(
        cfg.num_hidden_layers * cfg.num_key_value_heads, params["budget"], params.get("sink", 4),
        params.get("cascades", 4), params.get("schedule", "pow2"), params.get("decay", 0.9999999),
    )  # fmt: skip


CASES = {
    # name: (policy params, prefill stride)
    "pow2-stride1": ({"budget": 14, "sink": 2, "cascades": 3, "decay": 0.9}, 1),
    "pow2-stride5": ({"budget": 14, "sink": 2, "cascades": 3, "decay": 0.9}, 5),
    "pow2-oneshot": ({"budget": 13, "sink": 4, "cascades": 4, "decay": 0.8}, None),
    "pow2-w1": ({"budget": 7, "sink": 1, "cascades": 4, "decay": 1.0}, 3),
    "pow2-tiny-budget": ({"budget": 4, "sink": 2, "cascades": 4, "decay": 0.9}, 7),
    "every": ({"budget": 12, "sink": 3, "cascades": 2, "schedule": "every"}, 4),
    "max-stride1": ({"budget": 14, "sink": 2, "cascades": 3, "decay": 0.9, "head_reduction": "max"}, 1),
    "max-stride5": ({"budget": 14, "sink": 2, "cascades": 3, "decay": 0.9, "head_reduction": "max"}, 5),
    "max-oneshot": ({"budget": 13, "sink": 4, "cascades": 4, "decay": 0.8, "head_reduction": "max"}, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cascading_matches_masked_reference(model, sharp_model, ids, case):
    params, stride = CASES[case]
    if case.startswith("max"):
        model = sharp_model
    trace = []
    got = cache_logits(
        model, ids, N_PROMPT, buzz.make_cache("cascading", model, prefill_stride=stride, **params), trace
    )
    heads = "max" if params.get("head_reduction") == "max" else "sum"
    if stride == 1:  # one token per forward from the first: the plain reference with a one-token "prompt"
        want = reference_logits(model, ids, 1, rule_for(model, params), heads=heads)
    elif stride is None:
        want = reference_logits(model, ids, N_PROMPT, rule_for(model, params), heads=heads)
    else:
        chunks = right_aligned(N_PROMPT, stride)
        want = reference_logits(model, ids, N_PROMPT, rule_for(model, params), heads=heads, chunks=chunks)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert max(trace) <= params["budget"] and trace[-1] == params["budget"]


def test_reference_prompt_chunks_change_nothing_without_eviction(model, ids):
    """The reference's chunked prompt: with a rule that keeps everything, each token's logits are those of one
    forward over the whole prompt, however the prompt is cut."""
    keep_all = lambda stored, scores, t: stored  # noqa: E731
    want = reference_logits(model, ids[:40], N_PROMPT, keep_all)
    got = reference_logits(model, ids[:40], N_PROMPT, keep_all, chunks=[5, 7, 12])
    torch.testing.assert_close(got[2:], want, atol=1e-5, rtol=0)


def test_cascade_reaches_further_back_than_a_window(model, ids):
    """With pow2 the sub-caches hold tokens from further back than a window of the same size would."""
    cache = buzz.make_cache("cascading", model, budget=12, sink=0, cascades=3, prefill_stride=4)
    cache_logits(model, ids, N_PROMPT, cache, [])
    layer = cache.layers[0]
    oldest = layer.pos.masked_fill(~layer.valid, 1 << 30).amin(-1)
    assert bool((oldest < len(ids) - 12).all())


def test_one_cascade_equals_streaming_llm(model, ids):
    trace = []
    for stride in (None, 1):
        cas = buzz.make_cache("cascading", model, budget=10, sink=3, cascades=1, prefill_stride=stride)
        got = cache_logits(model, ids, N_PROMPT, cas, trace)
        if stride is None:
            want = cache_logits(model, ids, N_PROMPT, buzz.make_cache("streaming_llm", model, budget=10, sink=3), [])
        else:
            want = reference_logits(model, ids, 1, streaming_rule(10, 3))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stride", [None, 4])
def test_budget_above_sequence_equals_full(model, ids, stride):
    full = cache_logits(model, ids, N_PROMPT, buzz.make_cache("full", model), [])
    cas = buzz.make_cache("cascading", model, budget=len(ids) + 1, prefill_stride=stride)
    got = cache_logits(model, ids, N_PROMPT, cas, [])
    torch.testing.assert_close(got[-len(full) :], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "params",
    [
        {"budget": 0.5, "sink": 2, "cascades": 3, "decay": 0.9, "prefill_stride": 4},
        {"budget": 11, "sink": 4, "cascades": 2, "decay": 0.9, "prefill_stride": None},
    ],
)
def test_padded_batch_equals_one_by_one(model, params):
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (30, 17, 9, 22)]
    batched = greedy_strided(model, prompts, buzz.make_cache("cascading", model, **params), steps=18)
    for i, p in enumerate(prompts):
        alone = greedy_strided(model, [p], buzz.make_cache("cascading", model, **params), steps=18)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=0)


def greedy_strided(model, prompts, cache, steps):
    """`tests.test_policies.greedy`, with the prompt prefilled by the runner (strided when the policy says so)."""
    return greedy(model, prompts, cache, steps, runner_prefill=True)


def test_unstrided_batch_matches_policies_greedy(model):
    """Without a stride the runner's prefill is the plain one-forward prefill."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    params = {"budget": 5, "sink": 1, "cascades": 2, "prefill_stride": None}
    a = greedy_strided(model, prompts, buzz.make_cache("cascading", model, **params), steps=6)
    b = greedy(model, prompts, buzz.make_cache("cascading", model, **params), steps=6)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "key,bad",
    [("cascades", 0), ("sink", -1), ("schedule", "pow3"), ("decay", 0.0), ("head_reduction", "median"),
     ("prefill_stride", 0)],
)  # fmt: skip
def test_bad_option_is_one_line_error(model, key, bad):
    with pytest.raises(ValueError, match=rf"cache.{key}=.* is invalid; allowed") as e:
        buzz.make_cache("cascading", model, **{key: bad})
    assert "\n" not in str(e.value)


def test_max_over_heads_changes_the_decisions(sharp_model, ids):
    """On the sharp model, head_reduction=max keeps other tokens than mean (so the max cases above test it)."""
    kept = []
    for heads in ("mean", "max"):
        params = {"budget": 14, "sink": 2, "cascades": 3, "decay": 0.9, "head_reduction": heads}
        cache = buzz.make_cache("cascading", sharp_model, prefill_stride=5, **params)
        cache_logits(sharp_model, ids, N_PROMPT, cache, [])
        kept.append(torch.stack([layer.pos.sort(-1).values for layer in cache.layers]))
    assert (kept[0] != kept[1]).any()


def test_max_scores_do_not_depend_on_row_blocks(sharp_model, ids, monkeypatch):
    """The scored attention goes over the query rows in blocks; max over heads is taken after the sum over all rows."""
    import buzz.attention as attention

    scores = []
    for block_bytes in (None, 1):  # 1 byte: one query row per block
        if block_bytes:
            monkeypatch.setattr(attention, "SCORE_BLOCK_BYTES", {"cpu": block_bytes})
        cache = buzz.make_cache("cascading", sharp_model, budget=64, prefill_stride=None, head_reduction="max")
        with torch.no_grad():
            sharp_model(torch.tensor([ids[:N_PROMPT]]), past_key_values=cache)
        scores.append(torch.stack([layer.score for layer in cache.layers]))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-6, rtol=0)

"""BUZZ and buzz_paper against a list-based re-implementation of the released code's rule, token by token."""

from __future__ import annotations

import statistics

import pytest
import torch

import buzz
from tests.reference import reference_logits
from tests.test_policies import cache_logits, greedy

N_PROMPT, N_DECODE = 24, 40


class BuzzRule:
    """The released rule on Python lists: the stored positions in order are sink + samples + rest-of-middle +
    window; `cur` (per layer and head) counts the samples, which are the first `cur` entries of the middle."""

    keyed = True

    def __init__(self, sink: int, window: int, threshold: int, stride: int, bounded: bool) -> None:
        self.s, self.w, self.t, self.stride, self.bounded = sink, window, threshold, stride, bounded
        self.cur: dict = {}

    def __call__(self, stored, scores, seen, key):
        order = sorted(stored)
        n = len(order)
        if n <= self.s + self.w:
            return set(order)
        sink, middle, window = order[: self.s], order[self.s : n - self.w], order[n - self.w :]
        if len(middle) <= self.t:
            return set(order)
        cur = self.cur.get(key, 0)
        h = (self.stride + 1) // 2
        old = middle[:cur][::h]
        pushed = middle[cur:]
        new = [max(pushed[i : i + self.stride], key=lambda p: scores[p]) for i in range(0, len(pushed), self.stride)]
        samples = old + new
        if self.bounded:
            if self.t < 1:
                samples = []
            while len(samples) > self.t:
                samples = samples[:: max(h, 2)]
        self.cur[key] = len(samples)
        return set(sink + samples + window)


# name -> (policy, params, rule, budget or None)
CASES = {
    "paper_small": ("buzz_paper", {"sink": 2, "window": 4, "threshold": 6, "stride": 3}, (2, 4, 6, 3, False), None),
    "paper_stride5": ("buzz_paper", {"sink": 4, "window": 3, "threshold": 5, "stride": 5}, (4, 3, 5, 5, False), None),
    "budget_int": ("buzz", {"budget": 12, "sink": 2, "window": 3, "stride": 3}, (2, 3, 7, 3, True), 12),
    "budget_fraction": ("buzz", {"budget": 0.5, "window": 0.25, "stride": 2}, (4, 3, 5, 2, True), 12),
    # A prompt much longer than the budget: the prefill round's samples overflow the threshold and are thinned.
    "budget_overflow": ("buzz", {"budget": 9, "sink": 1, "window": 2, "stride": 3}, (1, 2, 6, 3, True), 9),
}


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 97, (N_PROMPT + N_DECODE,), generator=g).tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_buzz_matches_released_rule(model, ids, case):
    policy, params, rule_args, budget = CASES[case]
    trace = []
    got = cache_logits(model, ids, N_PROMPT, buzz.make_cache(policy, model, **params), trace)
    want = reference_logits(model, ids, N_PROMPT, BuzzRule(*rule_args))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    sink, window, threshold = rule_args[:3]
    assert max(trace) <= sink + window + threshold
    if budget is not None:
        assert max(trace) <= budget
    assert min(trace) < max(trace)  # rounds did happen


def test_rule_is_not_a_window(model, ids):
    """The reference distinguishes BUZZ from simpler rules (guards against a test that cannot fail)."""
    got = cache_logits(model, ids, N_PROMPT, buzz.make_cache("streaming_llm", model, budget=12, sink=2))
    want = reference_logits(model, ids, N_PROMPT, BuzzRule(2, 3, 7, 3, True))
    assert (got - want).abs().max() > 1e-3


def test_budget_above_sequence_equals_full(model, ids):
    full = cache_logits(model, ids, N_PROMPT, buzz.make_cache("full", model))
    got = cache_logits(model, ids, N_PROMPT, buzz.make_cache("buzz", model, budget=len(ids) + 1))
    torch.testing.assert_close(got, full, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "policy,params",
    [("buzz", {"budget": 0.5, "stride": 3}), ("buzz_paper", {"sink": 2, "window": 4, "threshold": 5, "stride": 3})],
)
def test_padded_batch_equals_one_by_one(model, policy, params):
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (30, 17, 24, 9, 28)]
    batched = greedy(model, prompts, buzz.make_cache(policy, model, **params), steps=24)
    for i, p in enumerate(prompts):
        alone = greedy(model, [p], buzz.make_cache(policy, model, **params), steps=24)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=0)


def test_paper_defaults_sawtooth(model):
    """The released defaults on a 600-token prompt: 4 + ceil(436 / 5) + 160 = 252 right after prefill, then the
    middle grows to 400 (564 stored) before each round; the buffer never grows past the host-side bound."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (600 + 900,), generator=g).tolist()
    cache = buzz.make_cache("buzz_paper", model)
    trace = []
    cache_logits(model, ids, 600, cache, trace)
    assert trace[0] == 252
    assert max(trace) == 564
    assert min(trace[1:]) >= 250 and 380 < statistics.fmean(trace) < 420
    assert all(layer.keys.shape[2] <= 564 + 1 + 64 for layer in cache.layers)


@pytest.mark.parametrize(
    "policy,params,match",
    [
        ("buzz", {"budget": None}, r"cache.budget=None is invalid for buzz"),
        ("buzz", {"budget": 0.3, "stride": 0}, r"cache.stride=0 is invalid; allowed: an int >= 1"),
        ("buzz", {"budget": 0.3, "window": 1.5}, r"cache.window=1.5 is invalid"),
        ("buzz_paper", {"budget": 0.3}, r"cache.budget=0.3 is invalid for buzz_paper"),
        ("buzz_paper", {"threshold": -1}, r"cache.threshold=-1 is invalid"),
    ],
)
def test_bad_params_are_one_line_errors(model, policy, params, match):
    with pytest.raises(ValueError, match=match) as e:
        buzz.make_cache(policy, model, **params)
    assert "\n" not in str(e.value)

"""`positions=in_cache`: stored keys re-rotated to their places in the cache (StreamingLLM's position rule).

Checked three ways: the re-rotation itself against keys rotated directly at the new positions; every policy that
offers the option against a reference that recomputes attention from scratch over exactly the kept tokens at
positions 0..k-1 (tests/reference.py, `positions="in_cache"`), token by token; and the usual budget-above-length
and padded-batch properties.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import buzz
from buzz.cache import rope_inv_freq, rotate_keys
from tests.reference import apply_rope, reference_logits
from tests.test_buzz import BuzzRule
from tests.test_cascading import cache_logits as strided_cache_logits
from tests.test_cascading import rule_for as cascade_rule
from tests.test_policies import cache_logits, greedy, streaming_rule

N_PROMPT, N_DECODE = 24, 36


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 97, (N_PROMPT + N_DECODE,), generator=g).tolist()


def rope_at(model, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`x` (1, H, C, D) rotated by the model's own RoPE at `positions` (C,)."""
    cos, sin = model.model.rotary_emb(x, positions[None])
    return apply_rotary_pos_emb(x, x, cos, sin)[1]


def test_rerotated_keys_equal_keys_rotated_directly(model):
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(1, 2, 40, model.config.head_dim, generator=g)
    p = torch.randint(0, 100, (40,), generator=g)
    new = torch.randint(0, 100, (40,), generator=g)
    moved = rotate_keys(rope_at(model, raw, p), (new - p).expand(1, 2, 40), rope_inv_freq(model))
    torch.testing.assert_close(moved, rope_at(model, raw, new), atol=1e-5, rtol=0)


def test_rerotation_keeps_float32_accuracy_over_long_shifts(model):
    """Shifts of tens of thousands of positions (streaming far past the trained context): compared with a float64
    rotation, the re-rotated float32 key is still exact to 1e-5."""
    g = torch.Generator().manual_seed(1)
    inv = rope_inv_freq(model)
    raw = torch.randn(1, 2, 30, model.config.head_dim, generator=g, dtype=torch.float64)
    p = torch.randint(60_000, 65_536, (30,), generator=g)
    new = torch.randint(0, 1024, (30,), generator=g)

    def exact(x, pos):
        angle = pos[:, None].double() * inv
        return apply_rope(x, torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1))

    moved = rotate_keys(exact(raw, p).float(), (new - p).expand(1, 2, 30), inv)
    torch.testing.assert_close(moved, exact(raw, new).float(), atol=1e-5, rtol=0)


# name -> (policy, params, rule factory, n_prompt of the reference)
CASES = {
    "streaming_llm": ("streaming_llm", {"budget": 12, "sink": 4}, lambda m: streaming_rule(12, 4), N_PROMPT),
    "streaming_llm_no_sink": ("streaming_llm", {"budget": 9, "sink": 0}, lambda m: streaming_rule(9, 0), N_PROMPT),
    "buzz": (
        "buzz", {"budget": 12, "sink": 2, "window": 3, "stride": 3}, lambda m: BuzzRule(2, 3, 7, 3, True), N_PROMPT,
    ),
    "buzz_paper": (
        "buzz_paper", {"sink": 2, "window": 4, "threshold": 6, "stride": 3}, lambda m: BuzzRule(2, 4, 6, 3, False),
        N_PROMPT,
    ),
    # one token per forward from the first: the policy evicts inside the prompt, at in-cache positions throughout
    "streaming_llm_stride1": (
        "streaming_llm", {"budget": 12, "sink": 4, "prefill_stride": 1}, lambda m: streaming_rule(12, 4), 1,
    ),
    "buzz_stride1": (
        "buzz", {"budget": 12, "sink": 2, "window": 3, "stride": 3, "prefill_stride": 1},
        lambda m: BuzzRule(2, 3, 7, 3, True), 1,
    ),
    # cascading one token per forward from the first (evicting inside the prompt), and in one prefill forward
    "cascading_stride1": (
        "cascading", {"budget": 14, "sink": 2, "cascades": 3, "decay": 0.9, "prefill_stride": 1},
        lambda m: cascade_rule(m, {"budget": 14, "sink": 2, "cascades": 3, "decay": 0.9}), 1,
    ),
    "cascading_oneshot": (
        "cascading", {"budget": 13, "sink": 4, "cascades": 4, "decay": 0.8, "prefill_stride": None},
        lambda m: cascade_rule(m, {"budget": 13, "sink": 4, "cascades": 4, "decay": 0.8}), N_PROMPT,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_cache_matches_attention_from_scratch_over_kept_tokens(model, ids, case):
    policy, params, rule, ref_prompt = CASES[case]
    cache = buzz.make_cache(policy, model, positions="in_cache", **params)
    trace = []
    if "prefill_stride" in params:  # through the runner's (strided) prefill
        got = strided_cache_logits(model, ids, N_PROMPT, cache, trace)
        if ref_prompt == 1:
            got = got[N_PROMPT - 1 :]  # the reference's logits start at the prompt's last token
    else:
        got = cache_logits(model, ids, N_PROMPT, cache, trace)
    want = reference_logits(model, ids, ref_prompt, rule(model), positions="in_cache")[-got.shape[0] :]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    absolute = reference_logits(model, ids, ref_prompt, rule(model))[-got.shape[0] :]
    if case == "streaming_llm_no_sink":  # a plain window has no gaps: shifting it changes no relative position
        torch.testing.assert_close(got, absolute, atol=1e-5, rtol=0)
    else:  # gaps closed up: not the absolute-position result (guards against a test that cannot fail)
        assert (got - absolute).abs().max() > 1e-3
    assert min(trace) < len(ids)  # it did evict


@pytest.mark.parametrize("policy", ["streaming_llm", "buzz", "cascading"])
def test_in_cache_with_budget_above_length_equals_full(model, ids, policy):
    full = cache_logits(model, ids, N_PROMPT, buzz.make_cache("full", model))
    got = cache_logits(model, ids, N_PROMPT, buzz.make_cache(policy, model, budget=len(ids) + 1, positions="in_cache"))
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "policy,params",
    [("streaming_llm", {"budget": 10}), ("buzz", {"budget": 0.5, "stride": 3}),
     ("cascading", {"budget": 11, "cascades": 3, "prefill_stride": None})],
)  # fmt: skip
def test_in_cache_padded_batch_equals_one_by_one(model, policy, params):
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (30, 17, 24, 9)]
    make = lambda: buzz.make_cache(policy, model, positions="in_cache", **params)  # noqa: E731
    batched = greedy(model, prompts, make(), steps=20)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(batched[i], greedy(model, [p], make(), steps=20)[0], atol=1e-4, rtol=0)


def test_bad_positions_are_one_line_errors(model):
    with pytest.raises(ValueError, match=r"cache.positions='relative' is invalid; allowed: absolute, in_cache"):
        buzz.make_cache("streaming_llm", model, positions="relative")
    with pytest.raises(ValueError, match="positions='in_cache' is invalid for less; allowed: absolute"):
        buzz.make_cache("less", model, kernels=None, base="streaming_llm", base_params={"positions": "in_cache"})
    with pytest.raises(ValueError, match="unexpected keyword argument 'positions'"):
        buzz.make_cache("h2o", model, positions="in_cache")

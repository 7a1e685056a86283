"""Every policy against an independent masked-attention reference, token by token, on a tiny random GQA Llama."""

from __future__ import annotations

import pytest
import torch

import buzz
from buzz.cache import EvictionCache
from buzz.runner import prefill_forwards
from tests.reference import reference_logits

N_PROMPT, N_DECODE, BUDGET = 24, 32, 12


def cache_logits(model, ids: list[int], n_prompt: int, cache: EvictionCache, trace: list | None = None):
    """Prefill `n_prompt` tokens, then feed the rest one at a time (teacher forcing) through `cache`."""
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([ids[:n_prompt]]), past_key_values=cache).logits
        out.append(logits[0, -1])
        if trace is not None:
            trace.append(int(cache.stored_tokens()[0]))
        for t in range(n_prompt, len(ids)):
            logits = model(torch.tensor([[ids[t]]]), past_key_values=cache).logits
            out.append(logits[0, -1])
            if trace is not None:
                trace.append(int(cache.stored_tokens()[0]))
    return torch.stack(out)


def window_rule(budget):
    return lambda stored, scores, seen: {p for p in stored if p >= seen - budget}


def streaming_rule(budget, sink):
    return lambda stored, scores, seen: {p for p in stored if p < sink or p >= seen - (budget - sink)}


def h2o_rule(budget, recent):
    def rule(stored, scores, seen):
        recent_set = {p for p in stored if p >= seen - recent}
        rest = sorted(stored - recent_set, key=lambda p: -scores[p])
        return recent_set | set(rest[: budget - recent])

    return rule


CASES = {
    "window": ({"budget": BUDGET}, window_rule(BUDGET)),
    "streaming_llm": ({"budget": BUDGET, "sink": 4}, streaming_rule(BUDGET, 4)),
    "h2o": ({"budget": BUDGET, "recent": 6}, h2o_rule(BUDGET, 6)),
    "h2o_fraction": ({"budget": 0.5, "recent": 0.25}, h2o_rule(N_PROMPT // 2, N_PROMPT // 8)),
}


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (N_PROMPT + N_DECODE,), generator=g).tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_policy_matches_masked_reference(model, ids, case):
    params, rule = CASES[case]
    policy = case.removesuffix("_fraction")
    trace = []
    got = cache_logits(model, ids, N_PROMPT, buzz.make_cache(policy, model, **params), trace)
    want = reference_logits(model, ids, N_PROMPT, rule)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    budget = params["budget"] if isinstance(params["budget"], int) else int(N_PROMPT * params["budget"])
    assert max(trace) <= budget and trace[-1] == budget


def test_full_equals_no_cache(model, ids):
    want = model(torch.tensor([ids])).logits[0, N_PROMPT - 1 :]
    got = cache_logits(model, ids, N_PROMPT, buzz.make_cache("full", model))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", ["window", "streaming_llm", "h2o"])
def test_budget_above_sequence_equals_full(model, ids, policy):
    full = cache_logits(model, ids, N_PROMPT, buzz.make_cache("full", model))
    got = cache_logits(model, ids, N_PROMPT, buzz.make_cache(policy, model, budget=len(ids) + 1))
    torch.testing.assert_close(got, full, atol=1e-6, rtol=0)


def greedy(model, prompts: list[list[int]], cache, steps: int, runner_prefill: bool = False) -> torch.Tensor:
    """Left-padded batched greedy decoding with per-step logits (B, steps, vocab). `runner_prefill`: the prompt goes
    through the runner's prefill (strided when the policy has a `prefill_stride`) instead of one forward."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    logits_seen = []
    with torch.no_grad():
        if runner_prefill:
            *_, logits = prefill_forwards(model, cache, "past_key_values", ids, mask, pos)
            logits = logits[:, -1]
        else:
            logits = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits[:, -1]
        for _ in range(steps):
            logits_seen.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            pos = pos[:, -1:] + 1
            logits = model(nxt, attention_mask=mask, position_ids=pos, past_key_values=cache).logits[:, -1]
    return torch.stack(logits_seen, 1)


@pytest.mark.parametrize(
    "policy,params",
    [("full", {}), ("window", {"budget": 0.5}), ("streaming_llm", {"budget": 10}), ("h2o", {"budget": 0.4})],
)
def test_padded_batch_equals_one_by_one(model, policy, params):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (30, 17, 24, 9, 30, 21, 12, 26)]
    batched = greedy(model, prompts, buzz.make_cache(policy, model, **params), steps=20)
    for i, p in enumerate(prompts):
        alone = greedy(model, [p], buzz.make_cache(policy, model, **params), steps=20)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=0)


def test_padding_never_takes_budget(model):
    prompts = [[5] * 20, [6] * 8]
    cache = buzz.make_cache("window", model, budget=0.5)
    greedy(model, prompts, cache, steps=3)
    assert cache.stored_tokens().tolist() == [10, 4]
    assert cache.get_seq_length() == 20 + 3


def test_generate_with_cache_equals_manual_loop(model, ids):
    prompt = torch.tensor([ids[:N_PROMPT]])
    out = model.generate(
        prompt, max_new_tokens=10, do_sample=False, past_key_values=buzz.make_cache("h2o", model, budget=8)
    )
    manual = greedy(model, [ids[:N_PROMPT]], buzz.make_cache("h2o", model, budget=8), steps=10)
    assert out[0, N_PROMPT:].tolist() == manual[0].argmax(-1).tolist()


@pytest.mark.parametrize("bad", [0, -3, 1.5, "x", True])
def test_bad_budget_is_one_line_error(model, bad):
    with pytest.raises(ValueError, match=r"cache.budget=.* is invalid; allowed") as e:
        buzz.make_cache("window", model, budget=bad)
    assert "\n" not in str(e.value)


def test_unknown_policy_lists_choices(model):
    with pytest.raises(ValueError, match="unknown; allowed: .*h2o.*window"):
        buzz.make_cache("nope", model)

"""Host-side bookkeeping that CUDA-graph decoding relies on (CPU: the graph replay itself is checked on a GPU by
scripts/gpu_check.py): reserved slots are enough for every step and are never taken back, and `replayed()`
reproduces the counters an eager step leaves."""

from __future__ import annotations

import pytest
import torch

import buzz
from tests.reference import tiny_llama

CASES = [
    ("full", {}),
    ("window", {"budget": 30}),
    ("h2o", {"budget": 30}),
    ("buzz", {"budget": 30, "stride": 3}),
    ("buzz_paper", {"sink": 2, "window": 6, "threshold": 12, "stride": 3}),
]


@pytest.mark.parametrize("policy,params", CASES)
def test_reserved_buffers_hold_every_step(policy, params):
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 90), generator=g)
    eager, bookkept = buzz.make_cache(policy, model, **params), buzz.make_cache(policy, model, **params)
    with torch.no_grad():
        for cache in (eager, bookkept):
            model(ids[:, :10], past_key_values=cache)  # a prefill below the budget: the cache still grows
        eager.reserve_steps(80)
        capacity = [layer.keys.shape[2] for layer in eager.layers]
        for t in range(10, 90):
            assert eager.free_slots() >= 1
            model(ids[:, t : t + 1], position_ids=torch.tensor([[t], [t]]), past_key_values=eager)
            bookkept.replayed(1)
    assert [layer.keys.shape[2] for layer in eager.layers] == capacity  # nothing grew or shrank mid-decode
    for a, b in zip(eager.layers, bookkept.layers):
        assert (a.bound, a.seen_columns, a.step) == (b.bound, b.seen_columns, b.step)
        assert int(a.valid.sum(-1).max()) <= a.bound

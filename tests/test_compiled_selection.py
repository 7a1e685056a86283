"""The decode-step selections that run compiled on CUDA (buzz's round, cascading's cascade) give exactly what the
eager functions give. Compiled here on the CPU (inductor's C++ backend) from the states of a real padded decode:
each call of the pure function is recorded, then replayed through `buzz.cache.compiled` (the prefill's calls
too, which recompiles once for their shapes)."""

from __future__ import annotations

import pytest
import torch

import baselines.cascading as cascading
import buzz.policies.buzz as buzz_policy
from buzz import cache as core
from buzz.cache import make_cache
from tests.test_policies import greedy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "policy,params,module,fn_name",
    [
        ("cascading", {"budget": 14, "sink": 2, "cascades": 3}, cascading, "_cascade"),
        ("cascading", {"budget": 14, "positions": "in_cache", "decay": 0.9}, cascading, "_cascade"),
        ("buzz", {"budget": 16, "stride": 3}, buzz_policy, "_round"),
    ],
)
def test_compiled_equals_eager(model, monkeypatch, policy, params, module, fn_name):
    eager = getattr(module, fn_name)
    calls = []

    def record(*args):
        calls.append([a.clone() if torch.is_tensor(a) else a for a in args])
        return eager(*args)

    monkeypatch.setattr(module, fn_name, record)
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (20, 9)]  # left-padded, one sample past its budget
    greedy(model, prompts, make_cache(policy, model, **params), steps=36)
    assert len(calls) >= 36 * model.config.num_hidden_layers  # the decode steps (the prefill's calls come along)

    fast = core.compiled(eager)
    for args in calls:
        with torch.inference_mode():
            want, got = eager(*args), fast(*args)
        for w, g in zip(want, got, strict=True):
            assert torch.equal(w, g)

"""LESS: the base policy plus a linear-attention state of what it evicts, on a tiny random GQA Llama (float32)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import buzz
from baselines.less import LessKernels, combine
from buzz.cache import EvictionLayer
from buzz.less_train import LayerData, attention_modules, capture_qkv, replay_base, train_kernels
from tests.reference import visible_mask
from tests.test_policies import cache_logits, greedy, h2o_rule

N_PROMPT, N_DECODE, BUDGET, RECENT = 24, 32, 12, 6


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (N_PROMPT + N_DECODE,), generator=g).tolist()


@pytest.fixture(scope="module")
def kernels_dir(model, tmp_path_factory):
    """Random kernels with a key scale large enough that the state weighs about as much as the stored tokens."""
    torch.manual_seed(3)
    c = model.config
    k = LessKernels.create(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, 16, hidden=16,
                           features=4, key_scale=0.5, manifest={"model": "tiny"})  # fmt: skip
    return k.save(tmp_path_factory.mktemp("less"))


def less(model, kernels, budget=BUDGET, **kw):
    return buzz.make_cache("less", model, budget=budget, kernels=None if kernels is None else str(kernels), **kw)


# --------------------------------------------------------------------------------------- an independent reference
# Every step re-runs the whole sequence with an eager attention in which row j attends exactly (softmax) to the
# tokens stored when j was processed plus itself, and through phi_q(q_j) . phi_k(k_i) to every earlier token that was
# evicted by then, both in one sum: out_j = (sum_vis e^s v + sum_ev phi v) / (sum_vis e^s + sum_ev phi), in float64.
# The kept sets come from the H2O rule over Python sets, scored with the softmax over the stored part.

LREF: dict = {}


def _less_ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    li, g = module.layer_idx, query.shape[1] // key.shape[1]
    maps = LREF["kernels"].maps[li]
    vis = LREF["visible"][li].repeat_interleave(g, 1)
    ev = LREF["evicted"][li].repeat_interleave(g, 1)
    k, v = key.double().repeat_interleave(g, 1), value.double().repeat_interleave(g, 1)
    e = torch.exp(query.double() @ k.transpose(-1, -2) * scaling) * vis
    pk = maps.phi_k(key).double().repeat_interleave(g, 1)
    lin = (maps.phi_q(query).double() @ pk.transpose(-1, -2)) * ev
    out = (e @ v + lin @ v) / (e.sum(-1, keepdim=True) + lin.sum(-1, keepdim=True))
    LREF["weights"][li] = e / e.sum(-1, keepdim=True)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("less_reference", _less_ref_attention)
AttentionMaskInterface.register("less_reference", lambda **kw: None)


def less_reference_logits(model, ids, n_prompt, rule, kernels):
    cfg = model.config
    n_layers, hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    g = cfg.num_attention_heads // hkv
    impl = cfg._attn_implementation
    model.set_attn_implementation("less_reference")
    visible = [[{j: set(range(j + 1)) for j in range(n_prompt)} for _ in range(hkv)] for _ in range(n_layers)]
    kept = [[set() for _ in range(hkv)] for _ in range(n_layers)]
    scores = [[{} for _ in range(hkv)] for _ in range(n_layers)]
    LREF.update(kernels=kernels, weights={})
    out = []
    try:
        for t in range(n_prompt, len(ids) + 1):
            LREF["visible"], LREF["evicted"] = {}, {}
            for layer in range(n_layers):
                vis = visible_mask(visible[layer], t)
                LREF["visible"][layer] = vis
                LREF["evicted"][layer] = torch.ones(t, t, dtype=torch.bool).tril(-1) & ~vis
            with torch.no_grad():
                logits = model(torch.tensor([ids[:t]]), position_ids=torch.arange(t)[None]).logits
            out.append(logits[0, -1])
            new_rows = range(0, n_prompt) if t == n_prompt else range(t - 1, t)
            for layer in range(n_layers):
                w = LREF["weights"][layer][0].view(hkv, g, t, t).sum(1)
                for h in range(hkv):
                    for j in new_rows:
                        for i in visible[layer][h][j]:
                            scores[layer][h][i] = scores[layer][h].get(i, 0.0) + float(w[h, j, i])
                    kept[layer][h] = rule(kept[layer][h] | set(new_rows), scores[layer][h], t)
                    if t < len(ids):
                        visible[layer][h][t] = kept[layer][h] | {t}
    finally:
        model.set_attn_implementation(impl)
    return torch.stack(out)


# --------------------------------------------------------------------------------------- tests


def test_matches_independent_reference(model, ids, kernels_dir):
    got = cache_logits(model, ids, N_PROMPT, less(model, kernels_dir, base_params={"recent": RECENT}))
    want = less_reference_logits(model, ids, N_PROMPT, h2o_rule(BUDGET, RECENT), LessKernels.load(kernels_dir))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # ... and the state matters here: without it the logits differ.
    base = cache_logits(model, ids, N_PROMPT, buzz.make_cache("h2o", model, budget=BUDGET, recent=RECENT))
    assert (got - base).abs().max() > 1e-2


@pytest.mark.parametrize("base,params", [("h2o", {"recent": RECENT}), ("window", {}), ("streaming_llm", {"sink": 2})])
def test_phi_zero_equals_base(model, ids, base, params):
    want = cache_logits(model, ids, N_PROMPT, buzz.make_cache(base, model, budget=BUDGET, **params))
    cache = less(model, None, base=base, base_params=params)
    got = cache_logits(model, ids, N_PROMPT, cache)
    # h2o takes the same explicit scored attention path either way: bit-identical; the others differ from SDPA's
    # rounding only.
    torch.testing.assert_close(got, want, atol=0 if base == "h2o" else 1e-5, rtol=0)
    assert all(float(h.abs().max()) == 0 and float(z.abs().max()) == 0 for h, z in cache.policy._state.values())


def test_budget_above_sequence_equals_full(model, ids, kernels_dir):
    full = cache_logits(model, ids, N_PROMPT, buzz.make_cache("full", model))
    got = cache_logits(model, ids, N_PROMPT, less(model, kernels_dir, budget=len(ids) + 1))
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def test_state_equals_bruteforce_over_evicted_tokens(model, kernels_dir):
    """After many padded decode steps, each layer's (H, z) is the sum over exactly the tokens the cache no longer
    holds (all real tokens seen minus the positions of the valid slots), recomputed from the keys and values
    recorded as they were written."""
    cache = less(model, kernels_dir, budget=0.4, base_params={"recent": 0.5})
    written = {i: [] for i in range(len(cache.layers))}
    for layer in cache.layers:

        def update(k, v, *a, _layer=layer, _orig=EvictionLayer.update, **kw):
            written[_layer.layer_idx].append((k.clone(), v.clone()))
            return _orig(_layer, k, v, *a, **kw)

        layer.update = update
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (30, 13)]
    greedy(model, prompts, cache, steps=40)
    kernels = LessKernels.load(kernels_dir)
    width = max(map(len, prompts))
    for li, layer in enumerate(cache.layers):
        keys = torch.cat([k for k, _ in written[li]], 2)  # (B, Hkv, columns, D), pads included
        values = torch.cat([v for _, v in written[li]], 2)
        h, z = cache.policy._state[li]
        for b, p in enumerate(prompts):
            real = torch.arange(width - len(p), keys.shape[2])  # this sample's real columns, in position order
            for head in range(keys.shape[1]):
                held = set(layer.pos[b, head][layer.valid[b, head]].tolist())
                gone = [i for i in range(len(real)) if i not in held]
                assert len(gone) == len(real) - int(len(p) * 0.4)
                cols = real[gone]
                phi = kernels.maps[li].phi_k(keys[b : b + 1, :, cols]).double()[0, head]  # (n, F)
                torch.testing.assert_close(h[b, head].double(), phi.T @ values[b, head, cols].double(), atol=1e-5,
                                           rtol=1e-5)  # fmt: skip
                torch.testing.assert_close(z[b, head].double(), phi.sum(0), atol=1e-5, rtol=1e-5)
    per_sample = sum(h[0].numel() + z[0].numel() for h, z in cache.policy._state.values()) * 4
    assert cache.extra_state_bytes() == per_sample == 2 * 2 * 4 * (16 + 1) * 4


def test_training_form_matches_cache(model, ids, kernels_dir):
    """The parallel form that training optimises (base policy replayed on captured q/k/v, one masked pass) gives the
    layer outputs the cache computes token by token (layer 0, whose inputs eviction cannot change)."""
    seq = torch.tensor([ids])
    q, k, v, scaling = capture_qkv(model, seq)[0]
    kept = replay_base("h2o", BUDGET, {"recent": RECENT}, q, k, v, N_PROMPT, scaling)
    attn = attention_modules(model)[0]
    data = LayerData(q, k, v, kept, N_PROMPT, scaling, attn.o_proj, "cpu")
    with torch.no_grad():
        want = data.less_out(LessKernels.load(kernels_dir).maps[0], torch.tensor([0]))[0]
    outs = []
    hook = attn.register_forward_hook(lambda m, a, o: outs.append(o[0][0, -1]))
    try:
        cache_logits(model, ids, N_PROMPT, less(model, kernels_dir, base_params={"recent": RECENT}))
    finally:
        hook.remove()
    got = torch.stack(outs[1:])  # rows N_PROMPT .. len(ids) - 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_combine_equals_formula():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 7, generator=g, dtype=torch.float64) * 4 + torch.tensor([[60.0], [0.0], [-30.0]]).double()
    v = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    hstate = torch.rand(3, 4, 5, generator=g, dtype=torch.float64) * 3
    z = torch.rand(3, 4, generator=g, dtype=torch.float64) * 2
    phi_q = torch.rand(3, 4, generator=g, dtype=torch.float64)
    num, den = torch.einsum("rf,rfd->rd", phi_q, hstate), torch.einsum("rf,rf->r", phi_q, z)
    want = (torch.einsum("rc,rcd->rd", s.exp(), v) + num) / (s.exp().sum(-1) + den)[:, None]
    soft = torch.einsum("rc,rcd->rd", s.softmax(-1), v)
    got = combine(soft.float(), s.logsumexp(-1).float(), num.float(), den.float())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # An empty state gives the softmax part exactly, with finite gradients.
    lse, zero = s.logsumexp(-1).float().requires_grad_(), torch.zeros(3, requires_grad=True)
    out = combine(soft.float(), lse, torch.zeros(3, 5), zero)
    assert torch.equal(out, soft.float())
    out.sum().backward()
    assert torch.isfinite(zero.grad).all() and torch.isfinite(lse.grad).all()


def test_padded_batch_equals_one_by_one(model, kernels_dir):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (30, 17, 9, 24)]
    batched = greedy(model, prompts, less(model, kernels_dir, budget=0.4), steps=16)
    for i, p in enumerate(prompts):
        alone = greedy(model, [p], less(model, kernels_dir, budget=0.4), steps=16)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=0)


def test_kernel_file_errors_are_one_line(model, tmp_path):
    with pytest.raises(ValueError, match="no kernels.safetensors") as e:
        less(model, tmp_path / "missing")
    assert "\n" not in str(e.value)
    other = LessKernels.create(3, 8, 2, 32, hidden=8, manifest={"model": "llama-other"}).save(tmp_path / "other")
    with pytest.raises(ValueError, match="trained for model llama-other .*model in use is tiny-llama") as e:
        less(model, other, model_name="tiny-llama")
    assert "\n" not in str(e.value)
    cache = less(model, other)  # no model name given: the shapes are checked at the first forward
    with pytest.raises(
        ValueError, match=r"trained for model llama-other \(3 layers.*model in use is .*head_dim 16"
    ) as e:
        cache_logits(model, list(range(10)), 8, cache)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="cache.kernels is required"):
        less(model, "???")
    with pytest.raises(ValueError, match="cache.base='less' is invalid"):
        less(model, None, base="less")


def test_training_lowers_matching_loss(model, tmp_path):
    g = torch.Generator().manual_seed(6)
    seqs = torch.randint(0, 97, (6, 48), generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threading only costs here
    try:
        kernels, report = train_kernels(model, seqs, base="h2o", budget=8, prefill=16, steps=30, lr=1e-2, hidden=16,
                                        features=4, batch_size=2, val_seqs=2)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert len(report) == model.config.num_hidden_layers
    for r in report:
        assert r["after"] < 0.5 * r["init"] and r["after"] < 0.5 * r["before"], r
    kernels.manifest.update(model="tiny", base="h2o", budget=8)
    out = kernels.save(tmp_path / "k")
    assert json.loads((out / "manifest.json").read_text())["num_layers"] == 2
    logits = cache_logits(model, seqs[0].tolist(), 16, less(model, out, budget=8))
    assert torch.isfinite(logits).all()

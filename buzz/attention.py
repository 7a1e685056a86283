"""The 'kvbench' attention implementation registered with transformers.

With an eviction cache in use, transformers' own mask no longer describes the stored slots (they are not
contiguous, differ per head after per-head selection, and padding sits in arbitrary slots), so this function
builds the mask from the cache's per-slot validity and positions. Policies that rank tokens by attention get the
column sums of the attention weights here, computed blockwise over queries so memory stays
O(query block x stored keys); the others keep SDPA.

The companion mask function hands the raw 2D padding mask through, so the attention function knows which new
tokens are padding. Without an eviction cache (plain forward, or another Cache) it is ordinary causal SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from buzz import cache as core
from buzz.kernels import (
    causal_attention_with_column_sums,
    decode_attention,
    fused_decode_available,
    fused_prefill_available,
)

NAME = "kvbench"
USE_FUSED_PREFILL = True  # Triton column sums for unpadded half-precision prefills on CUDA (see buzz.kernels)
USE_FUSED_DECODE = True  # Triton split-KV decode attention (scores fused) in half precision on CUDA
# float32 attention weights materialised at once when scoring (per forward of one layer)
SCORE_BLOCK_BYTES = {"cpu": 256 * 2**20, "cuda": 2 * 2**30}


def _passthrough_mask(*, attention_mask: torch.Tensor | None = None, **_) -> torch.Tensor | None:
    # The 2D (batch, seen + q) padding mask, or None when there is no padding.
    return attention_mask


def _real_new_tokens(attention_mask: torch.Tensor | None, b: int, q: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(b, q, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise ValueError("the kvbench attention expects a 2D padding mask, got a prepared 4D mask")
    return attention_mask[:, -q:].to(device=device, dtype=torch.bool)


def _gqa_inputs(query, key, value):
    """(key, value, enable_gqa) for SDPA. Flash attention takes grouped KV heads only in half precision; for a
    float32 model on CUDA, SDPA would fall back to the math kernel, which materialises every attention weight (36 GiB
    for a 32k-token prompt of a 9-head model), so the KV heads are repeated and the memory-efficient kernel runs."""
    gqa = query.shape[1] != key.shape[1]
    if gqa and query.is_cuda and query.dtype == torch.float32:
        g = query.shape[1] // key.shape[1]
        return key.repeat_interleave(g, 1), value.repeat_interleave(g, 1), False
    return key, value, gqa


def _plain_sdpa(module, query, key, value, attention_mask, scaling):
    """Causal attention with optional 2D padding, for forwards without an eviction cache."""
    q, kv = query.shape[2], key.shape[2]
    mask = None
    if attention_mask is not None:
        if attention_mask.dim() == 4:
            mask = attention_mask.bool()
        else:
            pad = attention_mask[:, -kv:].bool().to(query.device)
            causal = torch.ones(q, kv, dtype=torch.bool, device=query.device).tril(kv - q)
            mask = causal[None, None] & pad[:, None, None, :]
            mask = mask | ~mask.any(-1, keepdim=True)  # fully padded query rows: avoid NaN, output unused
    key, value, gqa = _gqa_inputs(query, key, value)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=mask is None and q > 1, scale=scaling, enable_gqa=gqa
    )
    return out.transpose(1, 2).contiguous(), None


def kvbench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = core._PENDING["layer"]
    if layer is None or layer.layer_idx != module.layer_idx:
        return _plain_sdpa(module, query, key, value, attention_mask, scaling)
    core._PENDING["layer"] = None
    b, hq, q, d = query.shape
    real_new = _real_new_tokens(attention_mask, b, q, query.device)
    empty = layer.bound == 0
    pos_new, slots = layer.write(real_new)
    # For positions=in_cache, keys re-rotated to their place in the cache (an empty cache has nothing to move).
    keys = layer.keys if empty else layer.attention_keys(real_new)
    if empty and attention_mask is None and layer.score is None:
        # Unpadded prefill of an empty cache: plain causal attention over the new tokens (flash kernels).
        key, value, gqa = _gqa_inputs(query, key, value)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=q > 1, scale=scaling, enable_gqa=gqa)
        layer.evict(slots)
        return out.transpose(1, 2).contiguous(), None
    mix = getattr(layer.policy, "mix_attention", None)
    if mix is not None and not empty:
        # A policy with state beside the slots (LESS): exact softmax over the slots, then the policy folds in its
        # own part through the softmax's log-sum-exp, before this forward's eviction updates that state.
        mask = _slot_mask(layer, pos_new, real_new)
        out, lse = _scored_attention(layer, query, keys, mask, real_new, scaling, True)
        out = mix(layer, query, out, lse, module=module)
        layer.evict(slots)
        return out, None
    if q == 1 and attention_mask is None and USE_FUSED_DECODE and fused_decode_available(query):
        # Decode step: every stored slot is older than the query, so validity is the whole mask.
        out = decode_attention(query, keys, layer.values, layer.valid, scaling, layer.score, layer.policy.score_heads)
        layer.evict(slots)
        return out.transpose(1, 2).contiguous(), None
    mask = _slot_mask(layer, pos_new, real_new)
    if layer.score is not None:
        if empty and attention_mask is None and q > 1 and USE_FUSED_PREFILL and fused_prefill_available(query):
            out, sums = causal_attention_with_column_sums(query, key, value, scaling)
            layer.score[:, :, :q] += core.combine_heads(sums.view(b, key.shape[1], -1, q), layer.policy.score_heads)
            layer.evict(slots)
            return out.transpose(1, 2).contiguous(), None
        out = _scored_attention(layer, query, keys, mask, real_new, scaling)
    else:
        out = _masked_sdpa(query, keys, layer.values, mask, scaling)
    layer.evict(slots)
    return out, None


def _slot_mask(layer, pos_new, real_new):
    heads = 1 if layer.uniform_heads else layer.keys.shape[1]
    # Slot j is visible to query i if it is valid and not in i's future. Fully masked rows only occur for
    # padding queries; let those see every slot (their outputs are never used) to keep softmax finite.
    mask = layer.valid[:, :heads, None, :] & (layer.pos[:, :heads, None, :] <= pos_new[:, None, :, None])
    return mask | ~real_new[:, None, :, None]


def _masked_sdpa(query, keys, values, mask, scaling):
    b, hq, q, d = query.shape
    hkv = keys.shape[1]
    if mask.shape[1] == 1:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=hq != hkv)
        return out.transpose(1, 2).contiguous()
    # Per-KV-head masks: fold each group's query heads into the query axis so one KV head serves them.
    g = hq // hkv
    qg = query.reshape(b, hkv, g * q, d)
    m = mask[:, :, None].expand(b, hkv, g, q, mask.shape[-1]).reshape(b, hkv, g * q, -1)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=m, scale=scaling)
    return out.view(b, hq, q, -1).transpose(1, 2).contiguous()


def _scored_attention(layer, query, keys, mask, real_new, scaling, with_lse=False):
    """Attention that also adds, per KV head, the attention each slot receives (summed over the group's query
    heads, or their maximum with the policy's `score_heads="max"`, and over the real query rows) to the layer's
    float32 scores (when it keeps scores). With `with_lse`, also
    returns the float32 log-sum-exp of each query row's logits over its visible slots, (B, Hq, q)."""
    b, hq, q, d = query.shape
    values = layer.values
    hkv, c = keys.shape[1], keys.shape[2]
    g = hq // hkv
    scale = scaling if scaling is not None else d**-0.5
    qg = query.view(b, hkv, g, q, d)
    block = max(1, SCORE_BLOCK_BYTES.get(query.device.type, 2**28) // max(1, b * hq * c * 4))
    outs, lses = [], []
    head_max = layer.score is not None and layer.policy.score_heads == "max"
    per_head = torch.zeros(b, hkv, g, c, dtype=torch.float32, device=query.device) if head_max else None
    for start in range(0, q, block):
        stop = min(q, start + block)
        logits = torch.einsum("bhgqd,bhcd->bhgqc", qg[:, :, :, start:stop], keys).float() * scale
        m = mask[:, :, None, start:stop]
        logits = logits.masked_fill(~m, float("-inf"))
        probs = logits.softmax(-1)
        outs.append(torch.einsum("bhgqc,bhcd->bhgqd", probs.to(values.dtype), values))
        if with_lse:
            lses.append(logits.logsumexp(-1))
        if layer.score is not None:
            rows = real_new[:, None, None, start:stop, None].to(probs.dtype)
            if head_max:  # the maximum over heads of each head's sum over all rows: sum over the blocks first
                per_head += (probs * rows).sum(3)
            else:
                layer.score += (probs * rows).sum(dim=(2, 3))
    if head_max:
        layer.score += core.combine_heads(per_head, "max")
    out = torch.cat(outs, 3) if len(outs) > 1 else outs[0]
    out = out.reshape(b, hq, q, -1).transpose(1, 2).contiguous()
    return (out, torch.cat(lses, 3).reshape(b, hq, q)) if with_lse else out


def register() -> None:
    AttentionInterface.register(NAME, kvbench_attention)
    AttentionMaskInterface.register(NAME, _passthrough_mask)


def use_kvbench_attention(model) -> None:
    register()
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


register()

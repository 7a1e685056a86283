"""An independent reference for eviction policies: full attention with a mask hiding the evicted tokens.

Each step re-runs the whole sequence through a tiny model with an eager attention function that applies, per layer
and per KV head, a mask in which row j sees exactly the tokens that were stored when token j was processed (plus
itself). That reproduces what an evicting cache computes without using any of its code: the kept sets come from
simple per-policy rules over Python sets, and attention scores come from the eager softmax weights.

With `positions="in_cache"` the model runs at position 0 everywhere (RoPE is then the identity, so queries and
keys arrive unrotated) and this attention rotates them itself, row by row, from a table of the model's cos/sin:
row j's visible tokens, in order, at positions 0..k-1 (the query being the last of them), i.e. attention
recomputed from scratch over exactly the tokens kept, at their places in the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface

REF = {"masks": {}, "weights": {}, "rope": None}


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout (Llama's), written out: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    k = key.repeat_interleave(g, 1)
    v = value.repeat_interleave(g, 1)
    mask = REF["masks"][module.layer_idx].repeat_interleave(g, 1)  # (b, hq, t, t) bool
    if REF["rope"] is None:
        logits = (query.float() @ k.float().transpose(-1, -2)) * scaling
    else:  # in-cache positions: key i of row j at its rank among row j's visible tokens; the query at its own
        cos, sin = REF["rope"]  # (t, d) for positions 0..t-1
        rank = (mask.long().cumsum(-1) - 1).clamp_min(0)  # (b, hq, t, t)
        k_rot = apply_rope(k.float()[:, :, None], cos[rank], sin[rank])  # (b, hq, t rows, t keys, d)
        q_pos = rank.diagonal(dim1=-2, dim2=-1)  # (b, hq, t)
        q_rot = apply_rope(query.float(), cos[q_pos], sin[q_pos])
        logits = torch.einsum("bhjd,bhjid->bhji", q_rot, k_rot) * scaling
    weights = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    REF["weights"][module.layer_idx] = weights
    return (weights @ v.float()).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("kvbench_reference", _ref_attention)
AttentionMaskInterface.register("kvbench_reference", lambda **kw: None)


def tiny_llama(seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 97) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval().float()


def visible_mask(visible_rows: list[list[set[int]]], t: int) -> torch.Tensor:
    """(1, Hkv, t, t) bool: row j of head h sees the positions in visible_rows[h][j]."""
    m = torch.zeros(1, len(visible_rows), t, t, dtype=torch.bool)
    for h, rows in enumerate(visible_rows):
        for j in range(t):
            m[0, h, j, sorted(rows[j])] = True
    return m


# A rule maps (kept positions, scores {pos: float}, tokens seen) -> positions to keep, for one layer and head.
# A rule with state of its own (one per layer and head) sets the attribute `keyed` and also gets (layer, head).
Rule = Callable[[set[int], dict[int, float], int], set[int]]


def received(weights: torch.Tensor, rows: Iterable[int], visible: dict[int, set[int]], heads: str = "sum"):
    """{position: attention it received} from `rows` of one KV head, given the weights (g, t, t) of the group's
    query heads: each head's weights summed over the rows it saw, then summed over the heads (`heads="sum"`) or
    their maximum ("max")."""
    if heads == "sum":
        weights = weights.sum(0, keepdim=True)
    per_head = []
    for w in weights:
        got: dict[int, float] = {}
        for j in rows:
            for i in visible[j]:
                got[i] = got.get(i, 0.0) + float(w[j, i])
        per_head.append(got)
    return {i: max(got[i] for got in per_head) for i in per_head[0]}


def reference_logits(
    model, ids: list[int], n_prompt: int, rule: Rule, positions: str = "absolute", heads: str = "sum",
    chunks: list[int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Logits (forwards, vocab) of each forward's last token: the prompt in forwards of `chunks` tokens (default: one
    forward of all `n_prompt`), then one token at a time; the rule runs after each forward. `positions`: "absolute"
    (each token at its index) or "in_cache" (see the module docstring). `heads`: how the scores combine a KV group's
    query heads (`received`)."""
    cfg = model.config
    n_layers, hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    g = cfg.num_attention_heads // hkv
    impl = cfg._attn_implementation
    model.set_attn_implementation("kvbench_reference")
    chunks = chunks or [n_prompt]
    assert sum(chunks) == n_prompt, (chunks, n_prompt)
    bounds = [0]
    for n in chunks + [1] * (len(ids) - n_prompt):
        bounds.append(bounds[-1] + n)
    # visible[l][h][j] = the set of positions row j may attend to: what was kept before its forward, and the
    # forward's own tokens up to itself.
    visible = [[{} for _ in range(hkv)] for _ in range(n_layers)]
    kept = [[set() for _ in range(hkv)] for _ in range(n_layers)]
    scores = [[{} for _ in range(hkv)] for _ in range(n_layers)]
    out = []
    try:
        for a, t in zip(bounds, bounds[1:]):  # this forward's tokens are [a, t)
            for layer in range(n_layers):
                for h in range(hkv):
                    for j in range(a, t):
                        visible[layer][h][j] = kept[layer][h] | set(range(a, j + 1))
            REF["masks"] = {layer: visible_mask(visible[layer], t) for layer in range(n_layers)}
            position_ids = torch.arange(t)[None]
            if positions == "in_cache":
                x = torch.zeros(1, t, 1)
                cos, sin = model.model.rotary_emb(x, position_ids)
                REF["rope"] = (cos[0].float(), sin[0].float())
                position_ids = torch.zeros_like(position_ids)  # RoPE = identity; _ref_attention rotates
            with torch.no_grad():
                logits = model(torch.tensor([ids[:t]]), position_ids=position_ids).logits
            out.append(logits[0, -1])
            for layer in range(n_layers):
                w = REF["weights"][layer][0].view(hkv, g, t, t)
                for h in range(hkv):
                    for i, got in received(w[h], range(a, t), visible[layer][h], heads).items():
                        scores[layer][h][i] = scores[layer][h].get(i, 0.0) + got
                    stored = kept[layer][h] | set(range(a, t))
                    if getattr(rule, "keyed", False):
                        kept[layer][h] = rule(stored, scores[layer][h], t, (layer, h))
                    else:
                        kept[layer][h] = rule(stored, scores[layer][h], t)
    finally:
        REF["rope"] = None
        model.set_attn_implementation(impl)
    return torch.stack(out)

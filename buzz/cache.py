"""The shared KV-cache core: storage, bookkeeping, score accumulation and eviction.

A policy (one small file in `baselines/` or `buzz/policies/`) only decides which stored slots to keep.
Everything else lives here:

* Storage is a per-layer slot buffer `(batch, kv_heads, capacity, head_dim)`. New tokens are written in place
  into free slots and evicted slots are only marked invalid, so a decode step touches O(budget) memory and the
  buffer shapes stay fixed once the cache has reached its budget (capacity = budget + 1).
* Attention over the slots is order-free (keys carry their RoPE rotation), so slots need no ordering; each slot
  records the absolute position `pos` of its token among the sample's real (non-pad) tokens.
* Eviction happens after the attention of each forward, prefill included: the step attends to the stored cache
  plus its own tokens, then the policy trims the cache.
* `get_seq_length()` returns tokens *seen* (so transformers derives absolute RoPE positions), while the number
  of *stored* tokens is `stored_tokens()`.
* Positions: keys are stored as the model rotated them, at their absolute position. A policy with
  `positions="in_cache"` (StreamingLLM's rule) instead has attention see each stored token at its slot's place in
  the cache: the tokens kept from earlier forwards, in position order, sit at consecutive positions right before
  the forward's own tokens. RoPE depends only on differences of positions, so that is the same as giving them
  positions 0..k-1 and the query position k; the stored keys are re-rotated by that shift on the fly, each
  forward, from the stored (absolute) keys, so no rounding error accumulates over steps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# The layer whose update() ran last; the attention function of the same layer consumes it (transformers calls
# cache.update and then the attention function, layer by layer, so one slot is enough).
_PENDING: dict[str, Any] = {"layer": None}

UNBOUNDED = 1 << 62
POSITIONS = ("absolute", "in_cache")


@dataclass
class LayerState:
    """What a policy sees of one layer after the attention of a forward (all tensors on the layer's device)."""

    valid: torch.Tensor  # (B, H, C) bool: slot holds a real, kept token
    pos: torch.Tensor  # (B, H, C) long: position of the slot's token among the sample's real tokens
    score: torch.Tensor | None  # (B, H, C) float32 accumulated attention (policies with needs_scores)
    seen: torch.Tensor  # (B,) long: real tokens seen so far, this forward included
    budget: torch.Tensor  # (B,) long: tokens each sample may keep
    new_slots: torch.Tensor  # (B, H, q) long: slots written by this forward
    n_new: int  # q, the tokens this forward added (at most this many are in excess of the budget)
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # policy-owned per-slot tensors
    layer_idx: int = 0
    step: int = 0  # forwards so far, this one included
    keys: torch.Tensor | None = None  # (B, H, C, D) the slots' keys (policies that look at what they evict)
    values: torch.Tensor | None = None  # (B, H, C, Dv) the slots' values


class Policy:
    """Base class of eviction policies. Subclasses set `name` and override `keep` (and `needs_scores`)."""

    name: ClassVar[str] = ""
    needs_scores: ClassVar[bool] = False
    positions: str = "absolute"  # RoPE positions attention sees: "absolute" or "in_cache" (module docstring)
    evicts: ClassVar[bool] = True  # False: keeps every token (the full cache)
    # Prompt tokens per forward for the runner's prefill (None: the whole prompt in one forward). Strided, the policy
    # evicts inside the prompt, and with positions=in_cache no forward sees positions past the cache size.
    prefill_stride: int | None = None
    prompt_tokens: torch.Tensor | None = None  # real prompt lengths (B,), set by the runner before a strided prefill
    # How a slot's score (needs_scores) combines the query heads of its KV group, per forward: "sum" of the attention
    # each head gave it, or its "max" over the heads (each head's attention summed over the forward's query rows).
    score_heads: str = "sum"
    # Per-slot tensors the core must keep aligned with the slots: name -> (dtype, value for a new token).
    slot_fields: ClassVar[dict[str, tuple[torch.dtype, float]]] = {}

    def __init__(self, budget: int | float | None = None, positions: str = "absolute") -> None:
        self.budget = check_budget(budget)
        if positions not in POSITIONS:
            raise ValueError(f"cache.positions={positions!r} is invalid; allowed: {', '.join(POSITIONS)}")
        self.positions = positions

    def keep(self, s: LayerState) -> torch.Tensor:
        """Boolean (B, H, C) mask of the valid slots to keep after this forward."""
        raise NotImplementedError

    def resolve_budget(self, prompt_tokens: torch.Tensor) -> torch.Tensor:
        """Per-sample token budget from the real prompt lengths (B,) of the first forward (of the whole prompt, when
        the runner prefills in strides and says so in `prompt_tokens`)."""
        if self.prompt_tokens is not None:
            prompt_tokens = self.prompt_tokens.to(prompt_tokens.device)
        if self.budget is None:
            return torch.full_like(prompt_tokens, UNBOUNDED)
        if isinstance(self.budget, float):
            return (prompt_tokens.double() * self.budget).floor().long().clamp_min(1)
        return torch.full_like(prompt_tokens, self.budget)

    def size_bound(self, max_budget: int, stored_bound: int) -> int:
        """Host-side upper bound of the tokens a head keeps after eviction, given an upper bound of what it held
        before (sizes buffers without syncs)."""
        return min(max_budget, stored_bound)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "prompt_tokens"}


def combine_heads(per_head: torch.Tensor, score_heads: str, dim: int = 2) -> torch.Tensor:
    """Scores per query head (the group's heads along `dim`) combined per KV head as `Policy.score_heads` says."""
    return per_head.amax(dim) if score_heads == "max" else per_head.sum(dim)


def check_prefill_stride(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"cache.prefill_stride={value!r} is invalid; allowed: an int >= 1 or null")
    return value


def check_budget(budget: Any) -> int | float | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"cache.budget={budget!r} is invalid; allowed: an int >= 1 (tokens) or a float in (0, 1]")
    if isinstance(budget, float):
        if budget.is_integer() and budget > 1:
            return int(budget)
        if not 0 < budget <= 1:
            raise ValueError(f"cache.budget={budget} is invalid; allowed: an int >= 1 (tokens) or a float in (0, 1]")
        return budget
    if budget < 1:
        raise ValueError(f"cache.budget={budget} is invalid; allowed: an int >= 1 (tokens) or a float in (0, 1]")
    return int(budget)


# ----------------------------------------------------------------------------------------------------------
# Selection helpers shared by policies (vectorised over batch, heads and slots; no host syncs).


def recent_mask(s: LayerState, n: torch.Tensor | int) -> torch.Tensor:
    """Slots holding one of the `n` most recent real tokens (n per sample or scalar)."""
    n = torch.as_tensor(n, device=s.pos.device).view(-1, 1, 1)
    return s.valid & (s.pos >= s.seen.view(-1, 1, 1) - n)


def sink_mask(s: LayerState, n: torch.Tensor | int) -> torch.Tensor:
    """Slots holding one of the first `n` real tokens (n per sample or scalar)."""
    n = torch.as_tensor(n, device=s.pos.device).view(-1, 1, 1)
    return s.valid & (s.pos < n)


def top_k_mask(values: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor, max_drop: int | None = None):
    """Among `candidates` (B, H, C), the k[b] slots with the largest `values`, per head.

    `max_drop` bounds how many candidates can be in excess of k (a forward adds `n_new` tokens to a cache that was
    within budget, so at most `n_new` go): then only the `max_drop` lowest are ranked, a top-k pass instead of a
    full sort, which keeps a decode step's selection proportional to what it evicts.
    """
    c = candidates.shape[-1]
    if max_drop is not None and max_drop < c:
        n_drop = (candidates.sum(-1) - k.view(-1, 1)).clamp_min(0)
        lowest = values.float().masked_fill(~candidates, math.inf).topk(max_drop, dim=-1, largest=False).indices
        rank = torch.arange(max_drop, device=values.device)
        drop = torch.zeros_like(candidates).scatter_(-1, lowest, rank < n_drop.unsqueeze(-1))
        return candidates & ~drop
    order = values.float().masked_fill(~candidates, -math.inf).sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(c, device=order.device).expand_as(order))
    return candidates & (rank < k.view(-1, 1, 1))


# On CUDA a policy's decode-step selection may run compiled: torch.compile fuses its many small element-wise and
# reduction kernels (launch-bound: ~100 per layer) into a few, captured in the step's CUDA graph like the rest.
# Prefills stay eager (their shapes vary per prompt). Compiled and eager compute the same (scripts/gpu_check.py,
# tests/test_compiled_selection.py). KVBENCH_COMPILE_SELECTION=0 turns it off (e.g. to measure what it saves). The
# first buffer size is compiled static; a second one makes the sizes dynamic (one more compile, then none).
COMPILE_DECODE_SELECTION = os.environ.get("KVBENCH_COMPILE_SELECTION", "1") != "0"
_COMPILED: dict[Any, Any] = {}


def compiled(fn: Any) -> Any:
    """`fn` (a pure function of tensors and constants) through `torch.compile(fullgraph=True)`, compiled once."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]


def rope_inv_freq(model: Any) -> torch.Tensor:
    """The model's RoPE inverse frequencies (float64, CPU), to re-rotate stored keys for `positions=in_cache`."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        raise ValueError(
            f"cache.positions=in_cache needs a model with rotary position embeddings; {type(model).__name__} has "
            "none (allowed here: absolute)"
        )
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):  # frequencies that change with the sequence length
        raise ValueError(
            f"cache.positions=in_cache needs fixed RoPE frequencies; this model's rope_type is {rope_type} "
            "(allowed here: absolute)"
        )
    return rotary.inv_freq.detach().double().cpu()


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """`keys` (..., C, D) moved `delta` (..., C) RoPE positions further (rotate-half layout, on the first
    2 * len(inv_freq) dims). A RoPE rotation by a then by b is one by a + b, so a key the model rotated to position
    p becomes the key of position p + delta; angles in float64 so large shifts keep float32 accuracy."""
    r = inv_freq.shape[-1]
    angle = delta.unsqueeze(-1).double() * inv_freq.to(device=keys.device, dtype=torch.float64)
    cos, sin = angle.cos().float(), angle.sin().float()
    x = keys.float()
    x1, x2 = x[..., :r], x[..., r : 2 * r]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * r :]], -1)
    return out.to(keys.dtype)


# ----------------------------------------------------------------------------------------------------------


class EvictionLayer(CacheLayerMixin):
    """One decoder layer's slot buffer, driven by a policy. See the module docstring."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: Policy, layer_idx: int, inv_freq: torch.Tensor | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.layer_idx = layer_idx
        self.rope_inv_freq = inv_freq  # set for positions=in_cache (float64, moved to the layer's device)
        self.seen_columns = 0  # tokens seen, pads included (what transformers calls the sequence length)
        self.step = 0
        self.bound = 0  # host-side upper bound of valid slots per head, to size the buffer without syncs
        self.min_capacity = 0  # slots promised by reserve(): compaction never shrinks below them
        self.max_budget = UNBOUNDED
        self.uniform_heads = True  # all heads keep the same slots (until a per-head policy evicts)
        self._pending_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- transformers' layer interface -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        dev = key_states.device
        self.device, self.dtype = dev, key_states.dtype
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.valid = torch.zeros(b, h, 0, dtype=torch.bool, device=dev)
        self.pos = torch.zeros(b, h, 0, dtype=torch.long, device=dev)
        self.score = torch.zeros(b, h, 0, dtype=torch.float32, device=dev) if self.policy.needs_scores else None
        self.fields = {n: torch.zeros(b, h, 0, dtype=dt, device=dev) for n, (dt, _) in self.policy.slot_fields.items()}
        self.seen = torch.zeros(b, dtype=torch.long, device=dev)
        self.budget = None
        if self.rope_inv_freq is not None:
            self.rope_inv_freq = self.rope_inv_freq.to(dev)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if _PENDING["layer"] is not None:
            raise RuntimeError(
                "eviction caches need the model's attention implementation 'kvbench' (buzz.make_cache sets it); "
                f"got a second cache update before attention ran: is attn_implementation={_PENDING['layer']!r}?"
            )
        self._pending_kv = (key_states, value_states)
        _PENDING["layer"] = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen_columns

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.keys.shape[2] if self.is_initialized else 0
        return stored + query_length, max(self.seen_columns - stored, 0)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.keys = self.values = None
        self.seen_columns = self.step = self.bound = self.min_capacity = 0
        self.uniform_heads = True
        self._pending_kv = None

    # --- the work ---------------------------------------------------------------------------------------
    def _grow(self, extra: int) -> None:
        b, h, _, d = self.keys.shape
        self.keys = torch.cat([self.keys, self.keys.new_zeros(b, h, extra, d)], 2)
        self.values = torch.cat([self.values, self.values.new_zeros(b, h, extra, self.values.shape[-1])], 2)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(b, h, extra)], 2)
        self.pos = torch.cat([self.pos, self.pos.new_zeros(b, h, extra)], 2)
        if self.score is not None:
            self.score = torch.cat([self.score, self.score.new_zeros(b, h, extra)], 2)
        for n, t in self.fields.items():
            self.fields[n] = torch.cat([t, t.new_zeros(b, h, extra)], 2)

    def _compact(self, capacity: int) -> None:
        """Move the valid slots to the front of a buffer of `capacity` slots (only after a large eviction)."""
        order = (~self.valid).to(torch.int8).sort(dim=-1, stable=True).indices[..., :capacity]
        d = self.keys.shape[-1]
        self.keys = self.keys.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, d))
        self.values = self.values.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, self.values.shape[-1]))
        self.valid = self.valid.gather(2, order)
        self.pos = self.pos.gather(2, order)
        if self.score is not None:
            self.score = self.score.gather(2, order)
        for n, t in self.fields.items():
            self.fields[n] = t.gather(2, order)

    def write(self, real_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the pending tokens into free slots. Returns (their positions (B, q), their slots (B, H, q))."""
        k, v = self._pending_kv
        self._pending_kv = None
        b, h, q, _ = k.shape
        pos_new = self.seen.view(-1, 1) + real_new.long().cumsum(-1) - 1
        pos_new = pos_new.masked_fill(~real_new, -1)
        if self.budget is None:  # first forward: the budget is resolved against the real prompt lengths
            self.budget = self.policy.resolve_budget(real_new.sum(-1))
            self.max_budget = int(self.budget.max())  # one host sync, at prefill only
        capacity = self.keys.shape[2]
        if capacity - self.bound < q:
            self._grow(q - (capacity - self.bound))
        if self.bound == 0:  # empty buffer: the new tokens take the first q slots
            slots = torch.arange(q, device=k.device).expand(b, h, q)
            self.keys[:, :, :q] = k
            self.values[:, :, :q] = v
        else:
            if q == 1:  # decode: the first free slot (a reduction, not a sort)
                slots = (~self.valid).to(torch.int8).argmax(-1, keepdim=True)
            else:
                slots = self.valid.to(torch.int8).sort(dim=-1, stable=True).indices[..., :q]
            d = k.shape[-1]
            self.keys.scatter_(2, slots.unsqueeze(-1).expand(-1, -1, -1, d), k)
            self.values.scatter_(2, slots.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]), v)
        self.valid.scatter_(2, slots, real_new.unsqueeze(1).expand(b, h, q))
        self.pos.scatter_(2, slots, pos_new.unsqueeze(1).expand(b, h, q))
        if self.score is not None:
            self.score.scatter_(2, slots, 0.0)
        for n, (_, init) in self.policy.slot_fields.items():
            self.fields[n].scatter_(2, slots, init)
        self.bound += q
        self.seen += real_new.sum(-1)  # in place: decode steps must be replayable as a CUDA graph
        self.seen_columns += q
        self.step += 1
        return pos_new, slots

    def attention_keys(self, real_new: torch.Tensor) -> torch.Tensor:
        """The stored keys as this forward's attention sees them, after write(): as stored (absolute positions), or
        for `positions=in_cache` the tokens kept from earlier forwards re-rotated to consecutive positions ending
        right before the forward's first real token (their order kept, per sample and head; see the module
        docstring). The forward's own tokens keep their positions."""
        if self.rope_inv_freq is None:
            return self.keys
        before = (self.seen - real_new.sum(-1)).view(-1, 1, 1)  # real tokens seen before this forward
        old = self.valid & (self.pos < before)
        order = self.pos.masked_fill(~old, UNBOUNDED).argsort(-1)
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
        )
        delta = torch.where(old, before - old.sum(-1, keepdim=True) + rank - self.pos, 0)
        return rotate_keys(self.keys, delta, self.rope_inv_freq)

    def evict(self, slots: torch.Tensor) -> None:
        state = LayerState(
            valid=self.valid, pos=self.pos, score=self.score, seen=self.seen, budget=self.budget,
            new_slots=slots, n_new=slots.shape[-1], fields=self.fields, layer_idx=self.layer_idx, step=self.step,
            keys=self.keys, values=self.values,
        )  # fmt: skip
        keep = self.policy.keep(state)
        if keep is not None:
            self.valid &= keep
            if not self.policy_keeps_heads_aligned:
                self.uniform_heads = False
        self.bound = self.policy.size_bound(self.max_budget, self.bound)
        # After a large eviction (typically the prefill), shrink the buffer to budget + 1 slots so that decode
        # steps read only what is kept; in steady state nothing moves.
        capacity = self.keys.shape[2]
        target = max(self.bound + 1, self.min_capacity)
        if self.bound < UNBOUNDED and capacity > target + max(64, self.bound // 8):
            self._compact(target)

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` more tokens now, so later steps never reallocate (CUDA-graph capture)."""
        free = self.keys.shape[2] - self.bound
        if free < tokens:
            self._grow(tokens - free)
        self.min_capacity = self.bound + tokens

    def reserve_steps(self, steps: int) -> None:
        """Reserve what `steps` one-token forwards can need at most: the host-side size bound is replayed step by
        step (a cache still below its budget grows; a bounded one needs budget + 1 slots), so the buffer never has
        to grow while the steps run as CUDA-graph replays."""
        bound, need = self.bound, self.bound
        for _ in range(steps):
            need = max(need, bound + 1)
            nxt = self.policy.size_bound(self.max_budget, bound + 1)
            if nxt == bound:  # steady state: every later step needs the same
                break
            bound = nxt
        self.reserve(need - self.bound)

    def replayed(self, q: int = 1) -> None:
        """Host-side bookkeeping of a step that ran as a CUDA-graph replay (its Python did not run): what write()
        and evict() would have done to the counters, so get_seq_length() and reserve() stay right."""
        self.bound = self.policy.size_bound(self.max_budget, self.bound + q)
        self.seen_columns += q
        self.step += 1

    @property
    def policy_keeps_heads_aligned(self) -> bool:
        return not getattr(self.policy, "per_head", False)

    def stored_tokens(self) -> torch.Tensor:
        """(B,) tokens stored per sample (largest over heads)."""
        if not self.is_initialized:
            return torch.zeros(0, dtype=torch.long)
        return self.valid.sum(-1).amax(-1)


class EvictionCache(Cache):
    """A `transformers.Cache` whose layers evict by a policy; pass it as `past_key_values`."""

    def __init__(self, policy: Policy, num_layers: int, inv_freq: torch.Tensor | None = None) -> None:
        if policy.positions == "in_cache" and inv_freq is None:
            raise ValueError("cache.positions=in_cache needs the model's RoPE frequencies (use buzz.make_cache)")
        inv_freq = inv_freq if policy.positions == "in_cache" else None
        super().__init__(layers=[EvictionLayer(policy, i, inv_freq) for i in range(num_layers)])
        self.policy = policy

    def stored_tokens(self) -> torch.Tensor:
        """(B,) tokens stored per sample, the largest over layers (all layers share one budget)."""
        counts = [layer.stored_tokens() for layer in self.layers if layer.is_initialized]
        return torch.stack([c.to(counts[0].device) for c in counts]).amax(0)

    def reserve(self, tokens: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.reserve(tokens)

    def reserve_steps(self, steps: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.reserve_steps(steps)

    def free_slots(self) -> int:
        """Slots a step can still write without reallocating (host-side bound; no sync)."""
        return min((layer.keys.shape[2] - layer.bound for layer in self.layers if layer.is_initialized), default=0)

    def replayed(self, q: int = 1) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.replayed(q)

    def extra_state_bytes(self) -> int:
        """Bytes per sample of policy state held beside the slots, all layers (e.g. LESS's linear-attention state)."""
        fn = getattr(self.policy, "extra_state_bytes", None)
        return int(fn()) if fn is not None else 0

    def extra_bytes_per_token(self) -> int:
        """Bytes of policy-owned per-slot data (beyond keys and values) per stored token, all layers."""
        fn = getattr(self.policy, "extra_bytes_per_token", None)
        return int(fn()) if fn is not None else 0

    def kv_bytes(self) -> int:
        """Bytes of key/value storage currently held (allocated buffers, all layers)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total


def cache_kwarg(model: Any) -> str:
    """Name of the forward argument taking the cache: transformers renamed `past_key_values` to `cache` in late 5.x."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available to `make_cache` and the `cache=` config group by its name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    POLICIES[cls.name] = cls
    return cls


def load_policies() -> dict[str, type[Policy]]:
    import baselines  # noqa: F401  (registers the baselines)
    import buzz.policies  # noqa: F401  (registers BUZZ)

    return POLICIES


def make_policy(name: str, **params: Any) -> Policy:
    policies = load_policies()
    if name not in policies:
        raise ValueError(f"cache policy {name!r} is unknown; allowed: {', '.join(sorted(policies))}")
    cls = policies[name]
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"cache={name}: {e}") from None


def make_cache(policy: str, model: Any, **params: Any) -> EvictionCache:
    """A fresh cache for one generation: `make_cache("h2o", model, budget=0.2)`.

    Switches the model to the 'kvbench' attention implementation (plain SDPA when no eviction cache is in use),
    which applies the cache's per-slot mask and accumulates attention scores where the policy needs them.
    """
    from buzz.attention import use_kvbench_attention

    pol = make_policy(policy, **params)
    use_kvbench_attention(model)
    inv_freq = rope_inv_freq(model) if pol.positions == "in_cache" else None
    return EvictionCache(pol, model.config.get_text_config().num_hidden_layers, inv_freq)

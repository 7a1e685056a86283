"""Cascading KV cache (Willette et al., "Training-Free Exponential Context Extension via Cascading KV Cache",
ICLR 2025; reference code github.com/jeffwillette/cascading_kv_cache, `cascade/models/cascading_cache.py`).

The rule, per sample and KV head (what this file implements; `tests/test_cascading.py` checks it token by token
against a plain-Python transcription):

* The first `sink` real tokens are kept for good. The rest of the budget, M = budget - sinks, is split into
  `cascades` sub-caches of W_i = M // cascades (+1 for the first M % cascades of them) tokens, each a FIFO.
* Non-sink token number t (t = position - sinks) is offered to sub-cache 0. Sub-cache i *accepts* at time t when
  t % e_i == 0, with e_i = 2**i for `schedule=pow2` (the paper's default) and e_i = 1 for `schedule=every`.
  While t <= M (the paper's "eager fill") every sub-cache accepts, so the cache first fills up as a plain window.
* A token offered to sub-cache i:
  - accepted: appended if the sub-cache has room; else it takes the place of the sub-cache's oldest token, which
    is offered to sub-cache i+1 at the same time t (the oldest token of the last sub-cache is evicted);
  - not accepted: appended if the sub-cache is empty; else it competes with the sub-cache's most recent token and
    replaces it if its score is at least as large, else it is evicted. Either way the cascade stops there.
  With the paper's schedule each sub-cache i >= 1 accepts every other token that sub-cache i-1 pushes out (every
  2**i-th token overall), so sub-cache i spans about 2**i * W_i tokens: the cache reaches back
  W_0 + 2 W_1 + 4 W_2 + ... tokens, keeping the highest-scoring token of each older stretch.
* Score: an exponential moving average of the attention a token receives, per KV head, from the query heads of
  its group: ema <- decay ** n * ema + (attention received in this forward), n = real tokens of the forward.
  "Received from the group" is, per `head_reduction`, the sum over the group's query heads (`sum`), the paper's
  `mean` (the sum divided by the group size, which changes no comparison, so `mean` and `sum` are the same policy
  here), or their maximum (`max`: each query head's attention summed over the forward's query rows, then the
  maximum over the heads; the core computes it, `Policy.score_heads`).
* Prefill acts inside the prompt: with `prefill_stride` set the runner feeds the prompt in forwards of that many
  tokens (the paper's strided prefill), cut so that the last forward ends at the prompt's end; the cascade then
  processes each forward's tokens in order.

Deviations from the reference code, all deliberate:

* EMA scale: the paper adds (1 - beta) * attention; the constant factor is dropped (no comparison changes). Within a
  forward of several tokens the paper weights query row r by beta ** (q - 1 - r); the core gives only the sum over
  rows, so the rows of one forward are weighted alike (identical for one-token forwards; the paper's beta is
  0.9999999, where the difference is below float32 resolution anyway). Scores are float32 (the paper stores them
  in the model dtype).
* Like the paper's kernel, all decisions of one forward use the scores after that forward's attention.
* RoPE: by default keys keep their original (absolute) positions; `positions=in_cache` gives the paper's default,
  contiguous in-cache positions, StreamingLLM-style (the core re-rotates the stored keys each forward).
* Budget split: the paper needs the cache size to be a multiple of the sub-cache size; here the remainder goes to
  the first sub-caches, and with budget - sinks < cascades the trailing sub-caches are empty (tokens reaching them
  are evicted). Sinks count against the budget (the paper stores them beside its cache).
* Eager fill is always on (the paper's default `eager_fill=True`).

Implementation: each slot carries its sub-cache index (`casc`) and EMA in `slot_fields`. Within a sub-cache,
insertion order is position order (a token can only replace the most recent one with a newer one), so "oldest" and
"most recent" are the smallest and largest positions. A forward's tokens are processed sub-cache by sub-cache as
streams aligned on their arrival times (which arrive where is pure arithmetic; only which token wins a competition
depends on scores), so a forward of any length costs a fixed number of vectorised tensor operations and no host
syncs: a one-token decode step reads only the oldest and newest slot of each sub-cache; longer forwards sort the
slots once.
"""

from __future__ import annotations

import math

import torch

from buzz import cache as core
from buzz.cache import LayerState, Policy, check_prefill_stride, register_policy

NEW, SINK, DROPPED = 1 << 20, (1 << 20) + 1, (1 << 20) + 2  # `casc` markers besides sub-cache indices 0..K-1
SCHEDULES = ("pow2", "every")
HEAD_REDUCTIONS = ("mean", "sum", "max")
_POS_BITS = 40  # sort key: casc << _POS_BITS | pos


@register_policy
class Cascading(Policy):
    """Cascading KV cache: `sink` tokens plus `cascades` FIFO sub-caches, sub-cache i accepting only every
    2**i-th token (`schedule=pow2`); a token not accepted replaces the sub-cache's newest token if its attention EMA
    (`decay`) is at least as large. See the module docstring for the exact rule and the deviations."""

    name = "cascading"
    needs_scores = True
    per_head = True
    slot_fields = {"casc": (torch.long, NEW), "ema": (torch.float32, 0.0), "acc": (torch.float32, 0.0)}

    def __init__(
        self, budget: int | float = 0.5, sink: int = 4, cascades: int = 4, schedule: str = "pow2",
        decay: float = 0.9999999, head_reduction: str = "mean", prefill_stride: int | None = 512,
        positions: str = "absolute",
    ) -> None:  # fmt: skip
        super().__init__(budget, positions)
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise ValueError(f"cache.sink={sink!r} is invalid; allowed: an int >= 0")
        if isinstance(cascades, bool) or not isinstance(cascades, int) or not 1 <= cascades <= 62:
            raise ValueError(f"cache.cascades={cascades!r} is invalid; allowed: an int in [1, 62]")
        if schedule not in SCHEDULES:
            raise ValueError(f"cache.schedule={schedule!r} is invalid; allowed: {', '.join(SCHEDULES)}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ValueError(f"cache.decay={decay!r} is invalid; allowed: a float in (0, 1]")
        if head_reduction not in HEAD_REDUCTIONS:
            raise ValueError(
                f"cache.head_reduction={head_reduction!r} is invalid; allowed: {', '.join(HEAD_REDUCTIONS)}"
            )
        check_prefill_stride(prefill_stride)
        self.sink, self.cascades, self.schedule = sink, cascades, schedule
        self.decay, self.head_reduction, self.prefill_stride = float(decay), head_reduction, prefill_stride
        self.every = [2**i if schedule == "pow2" else 1 for i in range(cascades)]
        self.score_heads = "max" if head_reduction == "max" else "sum"

    def keep(self, s: LayerState) -> torch.Tensor:
        step = _cascade
        if s.n_new == 1 and s.valid.is_cuda and core.COMPILE_DECODE_SELECTION:
            step = core.compiled(_cascade)
        f = s.fields
        keep, casc, ema = step(s.valid, s.pos, f["casc"], f["ema"], f["acc"], s.score, s.seen, s.budget, s.new_slots,
                               self.sink, tuple(self.every), self.decay)  # fmt: skip
        f["casc"].copy_(casc)
        f["ema"].copy_(ema)
        f["acc"].copy_(s.score)
        return keep

    def describe(self) -> dict:
        return {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and k not in ("every", "prompt_tokens", "score_heads")
        }


def _cascade(valid, pos, casc, ema, acc, score, seen, budget, new_slots, sink_max: int, every: tuple, decay: float):
    """One forward's cascade for every sample and KV head: (slots to keep, the new `casc` field, the new EMA).
    A pure function of tensors and constants, so it compiles (decode steps on CUDA, `keep`)."""
    b, h, c = valid.shape
    k, q = len(every), new_slots.shape[-1]
    dev = valid.device

    # Scores: EMA of the attention received, from the core's running sum (acc = that sum at the last forward).
    new_real = valid.gather(2, new_slots)[:, 0]  # (B, q): real (non-pad) tokens of this forward
    n_real = new_real.sum(-1)
    if decay != 1.0:
        ema = ema * torch.pow(decay, n_real.double()).float().view(b, 1, 1)
    ema = ema + (score - acc)

    # Layout of the budget, per sample.
    n_sink = budget.clamp(max=sink_max)
    m = budget - n_sink  # tokens in the sub-caches
    idx = torch.arange(k, device=dev)
    w = m.view(-1, 1) // k + (idx < m.view(-1, 1) % k).long()  # (B, K) sub-cache sizes
    cum_w = w.cumsum(-1)
    off = cum_w - w  # first rank of each sub-cache
    t_slot = pos - n_sink.view(b, 1, 1)  # time of each slot's token (negative: sink)
    sink = valid & (t_slot < 0)

    # Eager fill (t <= M): the sub-caches hold a window, newest tokens in sub-cache 0. Samples whose forward has
    # eager tokens get the window after the last of them (pure arithmetic), the others keep their state.
    t_first = seen - n_real - n_sink
    t_last = seen - 1 - n_sink
    t_eager = torch.minimum(t_last, m)
    has_eager = t_first.clamp_min(0) <= t_eager
    rank = t_eager.view(b, 1, 1) - t_slot  # 0 = newest
    by_rank = torch.searchsorted(cum_w, rank.clamp_min(0).view(b, h * c), right=True).view(b, h, c)
    window = torch.where(t_slot > t_eager.view(b, 1, 1), NEW, torch.where(rank < m.view(b, 1, 1), by_rank, DROPPED))
    state = torch.where(has_eager.view(b, 1, 1), window, casc)
    state = torch.where(sink, SINK, torch.where(valid, state, DROPPED))

    # Steady state (t > M; every sub-cache full): the forward's tokens as a stream over arrival times.
    t_new = pos.gather(2, new_slots)[:, 0] - n_sink.view(b, 1)  # (B, q)
    present = new_real & (t_new > m.view(b, 1))
    steady = present.any(-1)
    slot_in = new_slots
    in_casc = (state < k) & valid
    if q == 1:  # decode: only each sub-cache's oldest and newest slot can move
        key = pos * c + torch.arange(c, device=dev)
        bucket = torch.where(in_casc, state, k)
        lo = key.new_full((b, h, k + 1), torch.iinfo(torch.long).max).scatter_reduce(2, bucket, key, "amin")
        hi = key.new_full((b, h, k + 1), -1).scatter_reduce(2, bucket, key, "amax")
        oldest, newest = (lo[..., :k] % c).clamp(0, c - 1), (hi[..., :k] % c).clamp(0, c - 1)
        slot_ids = torch.arange(c, device=dev)
        is_old = slot_ids == oldest.gather(2, bucket.clamp(max=k - 1))
        is_new = slot_ids == newest.gather(2, bucket.clamp(max=k - 1))
        w_slot = w.view(b, 1, k).expand(b, h, k).gather(2, bucket.clamp(max=k - 1))
        rank_in = torch.where(is_new, w_slot - 1, torch.where(is_old, 0, 1))

        def entry(i: int, j: torch.Tensor) -> torch.Tensor:  # j-th oldest slot of sub-cache i, j in {0, W_i - 1}
            return torch.where(j <= 0, oldest[:, :, i : i + 1], newest[:, :, i : i + 1]).expand_as(j)
    else:
        key = torch.where(in_casc, (state << _POS_BITS) | pos, torch.iinfo(torch.long).max)
        order = key.argsort(-1)
        pos_in_order = torch.empty_like(order).scatter_(2, order, torch.arange(c, device=dev).expand(b, h, c))
        rank_in = pos_in_order - off.view(b, 1, k).expand(b, h, k).gather(2, state.clamp(0, k - 1))

        def entry(i: int, j: torch.Tensor) -> torch.Tensor:
            return order.gather(2, (off[:, i].view(b, 1, 1) + j).clamp(0, c - 1))

    final = torch.where(sink, SINK, DROPPED)
    arange_q = torch.arange(q, device=dev)
    for i in range(k):
        wi = w[:, i].view(b, 1)
        present = present & (wi > 0)
        push = present & (t_new % every[i] == 0)
        group = push.long().cumsum(-1)  # (B, q): group 0 continues the newest token's competition
        n_push = group[:, -1:]  # (B, 1)
        gidx = group.view(b, 1, q).expand(b, h, q)
        cand = ema.gather(2, slot_in).masked_fill(~present.view(b, 1, q), -math.inf)
        newest_i = entry(i, (wi - 1).view(b, 1, 1).expand(b, h, 1))  # (B, H, 1)
        best = cand.new_full((b, h, q + 1), -math.inf).scatter_reduce(2, gidx, cand, "amax")
        best[:, :, :1] = torch.maximum(best[:, :, :1], ema.gather(2, newest_i))
        wins = present.view(b, 1, q) & (cand == best.gather(2, gidx))
        champ = gidx.new_full((b, h, q + 1), -1).scatter_reduce(
            2, gidx, torch.where(wins, arange_q, -1).expand(b, h, q), "amax"
        )  # latest arrival with the group's best score (ties go to the later token); -1: the newest token stays
        champ_slot = torch.where(champ >= 0, slot_in.gather(2, champ.clamp_min(0)), newest_i)
        # What sub-cache i holds at the end: its entries, the last one replaced by group 0's champion, then one
        # champion per push; the first n_push of that sequence are pushed on to sub-cache i + 1.
        np3, w3 = n_push.view(b, 1, 1), wi.view(b, 1, 1)
        stays = (state == i) & (rank_in >= np3) & ((rank_in < w3 - 1) | ((champ[:, :, :1] < 0) & (rank_in == w3 - 1)))
        champ_stays = present.view(b, 1, q) & (champ.gather(2, gidx) == arange_q) & (gidx >= np3 - w3 + 1)
        marks = torch.zeros(b, h, c + 1, dtype=torch.bool, device=dev)
        marks.scatter_(2, torch.where(champ_stays, slot_in, c), True)
        final = torch.where(stays | marks[..., :c], i, final)
        j = gidx - 1  # the sequence index each push evicts
        pushed_out = torch.where(j < w3 - 1, entry(i, j), champ_slot.gather(2, (j - w3 + 1).clamp(0, q)))
        slot_in = torch.where(push.view(b, 1, q), pushed_out, slot_in)
        present = push
    state = torch.where(steady.view(b, 1, 1), final, state)
    return valid & (state != DROPPED), state, ema

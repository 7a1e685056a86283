"""BUZZ (Zhao et al., 2024): sink tokens, a sliding window, and a middle region of segmented heavy hitters.

The rule, as in the released code (`BuzzKVCacheWithAccumulation`), applied per KV head after every forward:

* The stored tokens, in position order, are `sink` (the first `sink` tokens), `window` (the last `window`
  tokens) and the middle between them. While the middle holds at most `threshold` tokens, nothing is evicted.
* When it exceeds `threshold`, a round runs. The middle is made of the samples kept by earlier rounds (its
  first part) and the tokens pushed out of the window since the last round (the rest, contiguous positions).
  - The earlier samples are thinned uniformly, keeping every ceil(stride / 2)-th (ranks 0, h, 2h, ...),
    without looking at scores; their accumulated scores are reset.
  - The newly pushed-out tokens are cut into segments of `stride` consecutive tokens (the last may be
    shorter) and each segment keeps the token with the largest accumulated attention (the first on ties).
* Scores are attention summed over every query row that attended to the token (prefill rows included),
  accumulated in float32, summed over the query heads sharing a KV head (grouped-query attention).

`buzz` takes the common `budget` and sizes the regions from it: `sink`, `window` = a fraction of the budget,
`threshold` = what remains, so a round leaves at most `budget` tokens. One case of the released rule can still
overflow: a round over a long prompt keeps ceil(pushed_out / stride) samples, more than `threshold` when the prompt
is much longer than the budget. There `buzz` thins the combined samples again, uniformly by the same step, until
they fit (a deviation the released code does not need because it never promises a budget). `buzz_paper` keeps the
released defaults (sink 4, window 160, threshold 400, stride 5) and no budget: its size saw-tooths.

Everything is tensor arithmetic over (batch, heads, slots): the round runs every step and is selected with
`torch.where`, so a decode step has no host syncs and can be captured in a CUDA graph. Each sample's rank among
the kept samples (position order) lives in a per-slot field, which is what makes the uniform thinning exact.
"""

from __future__ import annotations

import math

import torch

from buzz import cache as core
from buzz.cache import LayerState, Policy, check_prefill_stride, register_policy

BIG = 1 << 62


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"cache.{name}={value!r} is invalid; allowed: an int >= {low}")
    return value


@register_policy
class Buzz(Policy):
    """BUZZ sized by the common budget: sink + window (a fraction of the budget) + threshold (the rest)."""

    name = "buzz"
    needs_scores = True
    per_head = True
    slot_fields = {"rank": (torch.long, -1)}  # rank among the kept samples in position order; -1: not a sample
    bounded = True  # thin again when a round's samples exceed the threshold (keeps the budget)

    def __init__(
        self, budget: int | float = 0.5, sink: int = 4, window: int | float = 0.28, stride: int = 5,
        positions: str = "absolute", prefill_stride: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(budget, positions)
        self.prefill_stride = check_prefill_stride(prefill_stride)
        if self.budget is None and self.bounded:
            raise ValueError("cache.budget=None is invalid for buzz; allowed: an int >= 1 or a float in (0, 1]")
        self.sink = _check_int("sink", sink, 0)
        self.stride = _check_int("stride", stride, 1)
        if isinstance(window, bool) or not isinstance(window, (int, float)) or window < 0:
            raise ValueError(f"cache.window={window!r} is invalid; allowed: an int of tokens or a fraction in [0, 1)")
        if isinstance(window, float) and window >= 1:
            raise ValueError(f"cache.window={window} is invalid; allowed: a float fraction of the budget in [0, 1)")
        self.window = window

    # Region sizes per sample, (B, 1, 1) tensors.
    def regions(self, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = budget.view(-1, 1, 1)
        sink = b.clamp(max=self.sink)
        if isinstance(self.window, float):
            window = (b.double() * self.window).floor().long()
        else:
            window = torch.full_like(b, self.window)
        window = torch.minimum(window, b - sink)
        return sink, window, b - sink - window

    def keep(self, s: LayerState) -> torch.Tensor:
        sink_n, window_n, threshold = self.regions(s.budget)
        rule = _round
        if s.n_new == 1 and s.valid.is_cuda and core.COMPILE_DECODE_SELECTION:
            rule = core.compiled(_round)  # see buzz.cache.COMPILE_DECODE_SELECTION
        keep, rank, score = rule(s.valid, s.pos, s.fields["rank"], s.score, s.seen, sink_n, window_n, threshold,
                                 self.stride, self.bounded)  # fmt: skip
        s.fields["rank"].copy_(rank)
        s.score.copy_(score)
        return keep


def _round(valid, pos, rank, score, seen, sink_n, window_n, threshold, stride: int, bounded: bool):
    """One BUZZ round where the middle exceeds the threshold (per sample and head; elsewhere the slots stay as
    they are): (slots to keep, the new `rank` field, the new scores). A pure function, so it compiles."""
    c = valid.shape[-1]
    seen = seen.view(-1, 1, 1)
    sink = valid & (pos < sink_n)
    window = valid & (pos >= seen - window_n) & ~sink
    middle = valid & ~sink & ~window
    trigger = middle.sum(-1, keepdim=True) > threshold  # (B, H, 1)

    # Earlier samples: keep ranks 0, h, 2h, ... (uniform thinning, no scores).
    h = (stride + 1) // 2
    old = middle & (rank >= 0)
    old_kept = old & (rank % h == 0)
    n_old_kept = (old.sum(-1, keepdim=True) + h - 1) // h

    # Newly pushed out: segments of `stride` consecutive positions from the first of them; the arg-max of each.
    pushed = middle & (rank < 0)
    first = pos.masked_fill(~pushed, BIG).amin(-1, keepdim=True)
    segment = ((pos - first) // stride).clamp(0, c - 1)
    vals = score.masked_fill(~pushed, -math.inf)
    seg_max = torch.full_like(vals, -math.inf).scatter_reduce(-1, segment, vals, "amax")
    is_max = pushed & (vals == seg_max.gather(-1, segment))
    seg_first = torch.full_like(pos, BIG).scatter_reduce(-1, segment, pos.masked_fill(~is_max, BIG), "amin")
    new_kept = is_max & (pos == seg_first.gather(-1, segment))
    n_new = (pushed.sum(-1, keepdim=True) + stride - 1) // stride

    samples = old_kept | new_kept
    new_rank = torch.where(old_kept, rank // h, n_old_kept + segment)
    if bounded:  # thin the combined samples until they fit the threshold (see the module docstring)
        # Passes j: the least with ceil(n / step^j) <= threshold, i.e. n <= threshold * step^j (nested ceilings
        # of integer divisions compose). Closed form from a float log, then an exact integer correction.
        step = max(h, 2)
        n = n_old_kept + n_new
        ratio = n.double() / threshold.clamp_min(1).double()
        passes = (ratio.log() / math.log(step)).ceil().clamp_min(0).long()
        passes -= ((passes > 0) & (n <= threshold * torch.full_like(passes, step).pow(passes - 1))).long()
        passes += (n > threshold * torch.full_like(passes, step).pow(passes)).long()
        factor = torch.full_like(passes, step).pow(passes)
        samples &= (new_rank % factor == 0) & (threshold >= 1)
        new_rank = new_rank // factor

    rank = torch.where(trigger, torch.where(samples, new_rank, -1), rank)
    score = score.masked_fill(trigger & (sink | old_kept), 0.0)
    return torch.where(trigger, sink | window | samples, valid), rank, score


@register_policy
class BuzzPaper(Buzz):
    """BUZZ with the released code's fixed sizes (sink 4, window 160, threshold 400, stride 5) and no budget."""

    name = "buzz_paper"
    bounded = False

    def __init__(
        self, budget: None = None, sink: int = 4, window: int = 160, threshold: int = 400, stride: int = 5,
        positions: str = "absolute", prefill_stride: int | None = None,
    ) -> None:  # fmt: skip
        if budget is not None:
            raise ValueError(
                f"cache.budget={budget!r} is invalid for buzz_paper (fixed sizes); allowed: null, or use cache=buzz"
            )
        super().__init__(None, sink=sink, window=_check_int("window", window, 0), stride=stride, positions=positions,
                         prefill_stride=prefill_stride)  # fmt: skip
        self.threshold = _check_int("threshold", threshold, 0)

    def regions(self, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        one = torch.ones_like(budget).view(-1, 1, 1)
        return one * self.sink, one * self.window, one * self.threshold

    def size_bound(self, max_budget: int, stored_bound: int) -> int:
        # Without a round the middle holds at most `threshold`; a round keeps at most ceil(old / h) + ceil(new /
        # stride) <= middle / h + 2 samples, h = ceil(stride / 2) <= stride. Host arithmetic only (no syncs).
        h = (self.stride + 1) // 2
        ends = self.sink + self.window
        return min(stored_bound, max(ends + self.threshold, ends + max(stored_bound - ends, 0) // h + 2))

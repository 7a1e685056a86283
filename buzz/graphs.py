"""Decode steps replayed as CUDA graphs.

transformers' eager decoding is bound by kernel launches (hundreds per step), not by memory traffic. An
eviction cache whose buffers stop changing shape once it holds its budget (see `EvictionLayer.reserve` and the
in-place slot writes) lets the whole step, eviction included, be captured once and replayed.
"""

from __future__ import annotations

import torch


class GraphDecodeStep:
    """`step(token_ids (B, 1), position_ids (B, 1)) -> logits (B, vocab)` for one decode step through `cache`.

    The first `warmup` calls run eagerly (they are real steps); the next one captures the step and replays it.
    Inputs are copied into static buffers, so callers may pass fresh tensors. The caller must `cache.reserve()`
    enough slots first when the cache grows (the full policy); fixed-budget policies need nothing.
    """

    def __init__(self, model, cache, cache_kwarg: str = "past_key_values", warmup: int = 2) -> None:
        self.model, self.cache, self.kw, self.warmup = model, cache, cache_kwarg, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.ids = self.pos = self.logits = None
        self.calls = 0

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=pos, logits_to_keep=1, **{self.kw: self.cache})
        return out.logits[:, -1]

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not ids.is_cuda:
            return self._forward(ids, pos)
        if self.graph is None and self.calls <= self.warmup:
            # Eager warm-up on a side stream, as graph capture requires (allocator and cuBLAS workspaces).
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self._forward(ids, pos)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:
            self.ids, self.pos = ids.clone(), pos.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward(self.ids, self.pos)
            self.graph.replay()  # capture recorded the step without running it; the Python above did its bookkeeping
        else:
            if hasattr(self.cache, "free_slots") and self.cache.free_slots() < ids.shape[1]:
                raise RuntimeError("the cache has no free slot for this replayed step: call cache.reserve() first")
            self.ids.copy_(ids)
            self.pos.copy_(pos)
            self.graph.replay()
            if hasattr(self.cache, "replayed"):
                self.cache.replayed(ids.shape[1])
        return self.logits

import torch

from buzz.cache import LayerState, Policy, check_prefill_stride, recent_mask, register_policy, sink_mask


@register_policy
class StreamingLLM(Policy):
    """StreamingLLM (Xiao et al., 2023): the first `sink` tokens plus the most recent ones, `budget` in all.
    `positions=in_cache` is the paper's position rule for streaming past the trained context (buzz.cache)."""

    name = "streaming_llm"

    def __init__(
        self, budget: int | float = 0.5, sink: int = 4, positions: str = "absolute", prefill_stride: int | None = None
    ) -> None:
        super().__init__(budget, positions)
        self.prefill_stride = check_prefill_stride(prefill_stride)
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise ValueError(f"cache.sink={sink!r} is invalid; allowed: an int >= 0")
        self.sink = sink

    def keep(self, s: LayerState) -> torch.Tensor:
        n_sink = s.budget.clamp(max=self.sink)
        return sink_mask(s, n_sink) | recent_mask(s, s.budget - n_sink)

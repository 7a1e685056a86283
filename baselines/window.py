import torch

from buzz.cache import LayerState, Policy, recent_mask, register_policy


@register_policy
class Window(Policy):
    """Sliding window: the most recent `budget` tokens."""

    name = "window"

    def __init__(self, budget: int | float = 0.5) -> None:
        super().__init__(budget)

    def keep(self, s: LayerState) -> torch.Tensor:
        return recent_mask(s, s.budget)

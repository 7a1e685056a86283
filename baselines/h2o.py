import torch

from buzz.cache import LayerState, Policy, recent_mask, register_policy, top_k_mask


@register_policy
class H2O(Policy):
    """H2O (Zhang et al., 2023): the `recent` most recent tokens plus the heavy hitters, the tokens with the
    largest attention accumulated over every query row that attended to them (prefill rows included). Selection is
    per KV head on the scores of its query heads summed; kept tokens keep their scores."""

    name = "h2o"
    needs_scores = True
    per_head = True

    def __init__(self, budget: int | float = 0.5, recent: int | float = 0.5) -> None:
        super().__init__(budget)
        if isinstance(recent, bool) or not isinstance(recent, (int, float)) or recent < 0:
            raise ValueError(
                f"cache.recent={recent!r} is invalid; allowed: an int of tokens or a fraction of the budget"
            )
        if isinstance(recent, float) and recent > 1:
            raise ValueError(f"cache.recent={recent} is invalid; allowed: a float fraction of the budget in [0, 1]")
        self.recent = recent

    def recent_tokens(self, budget: torch.Tensor) -> torch.Tensor:
        if isinstance(self.recent, float):
            return (budget.double() * self.recent).floor().long()
        return budget.clamp(max=self.recent)

    def keep(self, s: LayerState) -> torch.Tensor:
        n_recent = self.recent_tokens(s.budget)
        recent = recent_mask(s, n_recent)
        heavy = top_k_mask(s.score, s.valid & ~recent, s.budget - n_recent, max_drop=s.n_new)
        return recent | heavy

from buzz.cache import LayerState, Policy, register_policy


@register_policy
class Full(Policy):
    """Keeps every token: the reference every policy is compared with."""

    name = "full"
    evicts = False  # teacher-forced streams can then be scored in chunks (buzz.runner.stream_nll)

    def __init__(self, budget: None = None) -> None:
        if budget is not None:
            raise ValueError(f"cache.budget={budget!r} is invalid for full; allowed: null")
        super().__init__(None)

    def keep(self, s: LayerState) -> None:
        return None

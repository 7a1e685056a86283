"""The BUZZ policy family (registered on import)."""

from buzz.policies import buzz  # noqa: F401

"""Baseline eviction policies; each module registers one policy with `buzz.cache.register_policy`."""

from baselines import full, h2o, streaming_llm, window  # noqa: F401

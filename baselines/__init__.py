"""Baseline eviction policies; each module registers one policy with `buzz.cache.register_policy`."""

import baselines.less  # noqa: F401  (LESS)
from baselines import cascading, full, h2o, streaming_llm, window  # noqa: F401

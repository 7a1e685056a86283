"""kvbench-buzz: a benchmarking harness for KV-cache eviction policies."""

from buzz.cache import EvictionCache, LayerState, Policy, make_cache, register_policy

__all__ = ["EvictionCache", "LayerState", "Policy", "make_cache", "register_policy"]

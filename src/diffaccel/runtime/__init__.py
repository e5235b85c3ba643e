"""Runtime: the executor that applies plans, its per-run cache state and work counters."""

from diffaccel.runtime.executor import CacheError, Executor, Stats, accelerate, disable, enable

__all__ = ["CacheError", "Executor", "Stats", "accelerate", "disable", "enable"]

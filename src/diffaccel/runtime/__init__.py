"""Runtime: the executor that applies plans, its step clock, per-run state and plan features."""

from diffaccel.errors import CacheError, PlanWarning
from diffaccel.runtime.executor import Executor
from diffaccel.runtime.session import accelerate, disable, enable
from diffaccel.runtime.state import Stats

__all__ = ["CacheError", "Executor", "PlanWarning", "Stats", "accelerate", "disable", "enable"]

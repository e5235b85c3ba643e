"""TaylorSeer: instead of reusing a unit's last output, extrapolate it from the last computed
outputs with a Taylor expansion (finite differences) of order 1 or 2 in the step index."""

from __future__ import annotations

from diffaccel.methods.block_cache import fora
from diffaccel.plan import Plan


def taylorseer(model, num_steps: int = 50, interval: int = 3, order: int = 1, warmup: int = 3,
               granularity: str = "block", components: tuple[str, ...] | None = None) -> Plan:
    """Full steps every ``interval`` steps after ``warmup`` full steps (at least ``order + 1``
    computed points are needed before a forecast is better than reuse)."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    return fora(model, num_steps, interval, warmup=max(warmup, order + 1), granularity=granularity,
                components=components, order=order)

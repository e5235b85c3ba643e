"""Per-run state of the executor: work counters, and the cache state of one trajectory."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from diffaccel.runtime.cache import UnitCache


@dataclass
class Stats:
    """Work actually done, summed over the denoiser calls of the latest pipeline call."""

    forwards: int = 0
    steps: int = 0  # denoiser evaluations per branch (the plan step count this call needs)
    computed: int = 0
    reused: int = 0
    forecast: int = 0
    macs: int = 0
    full_macs: int = 0  # what the same forwards cost without the plan

    @property
    def mac_ratio(self) -> float:
        return self.full_macs / self.macs if self.macs else float("nan")

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "steps": self.steps, "computed": self.computed, "reused": self.reused,
                "forecast": self.forecast, "macs": self.macs, "full_macs": self.full_macs}


@dataclass
class BranchState:
    """Cache state of one trajectory: one guidance branch of one pipeline call (one batch shape
    and branch when the model is driven without a scheduler)."""

    step: int = -1
    last_t: float | None = None
    caches: dict[int, UnitCache] = field(default_factory=lambda: defaultdict(UnitCache))
    tile: int = 1  # batch multiple of the current forward (parallel decoding runs several steps at once)
    # a run of consecutive residual units skipped alike acts as one: its first unit adds the run's
    # summed residual, the others pass their input through (one tensor pass instead of one per unit)
    passthrough: set[int] = field(default_factory=set)
    run_sums: dict[tuple[int, int], UnitCache] = field(default_factory=dict)
    features: dict[int, Any] = field(default_factory=dict)  # each feature's own per-branch state, by id
    finite: list[tuple[int, Any]] = field(default_factory=list)  # (unit, isfinite flag) of this forward

    def of(self, feature: object, make) -> Any:
        """The per-branch state of ``feature`` (made by ``make()`` on first use)."""
        key = id(feature)
        if key not in self.features:
            self.features[key] = make()
        return self.features[key]

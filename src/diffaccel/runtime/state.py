"""Per-run state of the executor: work counters, and the cache state of one trajectory."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from diffaccel.adapters import Unit
from diffaccel.runtime.cache import UnitCache, structure, tree_map


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
        """What the plan's caching saved on the forwards it ran. A plan with a ``solver`` section also
        runs fewer forwards than the pipeline's own sampler would: ``generate --compare`` and ``bench``
        count that against the pipeline's own run."""
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
    computed: dict[int, Any] = field(default_factory=dict)  # this forward's computed units' outputs, in order
    shape: tuple | None = None  # the input shape (batch included) the caches were filled at

    def forget(self) -> None:
        """Drop every cached value (each unit computes again at its next call)."""
        self.caches = defaultdict(UnitCache)
        self.run_sums = {}

    def of(self, feature: object, make: Callable[[], Any]) -> Any:
        """The per-branch state of ``feature`` (made by ``make()`` on first use)."""
        key = id(feature)
        if key not in self.features:
            self.features[key] = make()
        return self.features[key]


def merged_run(state: BranchState, units: list[Unit], first: int, action: str,
               action_of: Callable[[int], str]) -> UnitCache:
    """The summed cache of the run of residual units from ``first`` skipped with ``action`` at this
    step and computed at the same steps; marks the run's other units as pass-through."""
    steps, shape = state.caches[first].steps, structure(state.caches[first].last())
    last = first
    while (last + 1 < len(units) and units[last + 1].residual_inputs is not None
           and action_of(last + 1) == action and state.caches[last + 1].steps == steps
           and structure(state.caches[last + 1].last()) == shape):
        last += 1
    state.passthrough = set(range(first + 1, last + 1))
    if last == first:
        return state.caches[first]
    run = state.run_sums.get((first, last))
    if run is None or run.steps != steps:  # (re)build after the units computed again
        values = [state.caches[k].values for k in range(first, last + 1)]
        summed = [tree_map(lambda *leaves: functools.reduce(torch.add, leaves), *point) for point in zip(*values)]
        run = state.run_sums[(first, last)] = UnitCache(list(steps), summed)
    return run

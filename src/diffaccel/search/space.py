"""The search space: static C/R schedules, encoded compactly as one choice of *unit-set* per step.

A full binary encoding (one bit per step and unit) has T x N parameters (400 for 50 steps of an
8-unit model) and most of its points are nonsense: reusing a block while recomputing its
neighbours buys little and costs quality. Every useful hand-made schedule instead reuses one of a
few structured sets of units at a step, so the encoding is: step 0 computes everything, and each
later step picks a *level*, a named set of units to reuse:

* transformers (chains of residual blocks): ``C`` (compute all), ``mid`` (reuse all but the first
  and last unit, as dual-block caching does), ``tail`` (all but the first unit, first-block
  caching), ``all`` (reuse every unit, FORA / TaylorSeer-style);
* U-Nets: ``C``, ``deep1`` and ``deep0`` (DeepCache at skip branch 1 and 0: reuse what lies below
  the branch), ``enc`` (reuse the encoder, Faster Diffusion's encoder propagation), ``all``.

That is T-1 categorical parameters with 4-5 values each: small enough for a GA to move in, and it
still holds every hand-made plan of the registry (their schedules map onto it exactly, forecasts
read as reuse) plus all mixtures of them across steps, which no hand-made method produces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffaccel.adapters import adapter_for
from diffaccel.adapters.unet import deep_units
from diffaccel.methods.base import make_plan
from diffaccel.plan import Plan

Genome = tuple[str, ...]  # the level name of steps 1 .. T-1


@dataclass(frozen=True)
class Level:
    name: str
    reused: frozenset[str]


def transformer_levels(units: list[str]) -> list[Level]:
    levels = [Level("C", frozenset())]
    if len(units) >= 3:
        levels.append(Level("mid", frozenset(units[1:-1])))
    if len(units) >= 2:
        levels.append(Level("tail", frozenset(units[1:])))
    levels.append(Level("all", frozenset(units)))
    return levels


def unet_levels(units: list[str], num_levels: int) -> list[Level]:
    levels = [Level("C", frozenset())]
    for branch in (1, 0):
        if branch <= num_levels - 2:
            levels.append(Level(f"deep{branch}", frozenset(deep_units(num_levels, branch))))
    encoder = {u for u in units if u == "conv_in" or u.startswith("down.") or u == "mid"}
    levels.append(Level("enc", frozenset(encoder)))
    levels.append(Level("all", frozenset(units)))
    return levels


class Space:
    """Schedules of ``num_steps`` steps over ``units``, one level per step after the first."""

    def __init__(self, model: torch.nn.Module, num_steps: int, granularity: str = "block"):
        if num_steps < 2:
            raise ValueError(f"a search needs at least 2 steps, got {num_steps}")
        self.model = model
        self.adapter = adapter_for(model)
        self.granularity = granularity
        self.units = [u.name for u in self.adapter.units(model, granularity)]
        self.num_steps = num_steps
        if self.adapter.name == "unet":
            levels = unet_levels(self.units, len(model.down_blocks))
        else:
            levels = transformer_levels(self.units)
        unique: dict[frozenset, Level] = {}
        for level in levels:  # tiny models can make two levels the same set
            unique.setdefault(level.reused, level)
        self.levels = list(unique.values())
        self.by_name = {level.name: level for level in self.levels}
        self.param_names = [f"s{step:03d}" for step in range(1, num_steps)]

    # -- genomes, rows, plans --------------------------------------------------------------------
    def row(self, level: str) -> str:
        reused = self.by_name[level].reused
        return "".join("R" if u in reused else "C" for u in self.units)

    def rows(self, genome: Sequence[str]) -> list[str]:
        if len(genome) != self.num_steps - 1:
            raise ValueError(f"a genome has {self.num_steps - 1} genes, got {len(genome)}")
        return ["C" * len(self.units)] + [self.row(level) for level in genome]

    def genome(self, rows: Sequence[str]) -> Genome | None:
        """The genome of a schedule (forecasts read as reuse), or None if a row is no level."""
        if len(rows) != self.num_steps or set(rows[0]) != {"C"}:
            return None
        by_set = {level.reused: level.name for level in self.levels}
        genes = []
        for row in rows[1:]:
            reused = frozenset(u for u, a in zip(self.units, row) if a != "C")
            if reused not in by_set:
                return None
            genes.append(by_set[reused])
        return tuple(genes)

    def plan(self, genome: Sequence[str], method: str = "search", params: dict | None = None) -> Plan:
        return make_plan(self.model, self.rows(genome), method, dict(params or {}), granularity=self.granularity)

    def all_compute(self) -> Genome:
        return ("C",) * (self.num_steps - 1)

    # -- optuna parameters -------------------------------------------------------------------------
    def params(self, genome: Sequence[str]) -> dict[str, str]:
        return dict(zip(self.param_names, genome))

    def from_params(self, params: dict) -> Genome | None:
        if any(name not in params for name in self.param_names):
            return None
        return tuple(params[name] for name in self.param_names)

    def distributions(self) -> dict:
        from optuna.distributions import CategoricalDistribution

        choices = tuple(level.name for level in self.levels)
        return {name: CategoricalDistribution(choices) for name in self.param_names}

    def describe(self) -> str:
        return "; ".join(f"{level.name}: reuse {', '.join(u for u in self.units if u in level.reused) or 'nothing'}"
                         for level in self.levels)

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

The levels come from the adapter (``Adapter.levels``).

That is T-1 categorical parameters with 4-5 values each: small enough for a GA to move in, and it
still holds every hand-made plan of the registry (their schedules map onto it exactly, forecasts
read as reuse) plus all mixtures of them across steps, which no hand-made method produces.

A *joint* space (``quant`` given) also quantizes every plan with that spec, and with ``bits``
(weight bit widths to choose from) adds one gene per unit: the weight bits of the unit's layers,
the layer group the search varies (CacheQuant's joint cache + quantization search). Layers outside
the units keep the spec's bits. Schedule-only genomes (from DP, greedy, hand-made plans) are
completed with the spec's bits for every unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from optuna.distributions import CategoricalDistribution

from diffaccel.adapters import adapter_for
from diffaccel.methods.base import make_plan
from diffaccel.plan import Plan
from diffaccel.quant.spec import QuantSpec

Genome = tuple[str, ...]  # the level name of steps 1 .. T-1


class Space:
    """Schedules of ``num_steps`` steps over ``units``, one level per step after the first."""

    def __init__(self, model: torch.nn.Module, num_steps: int, granularity: str = "block",
                 quant: QuantSpec | None = None, bits: tuple[int, ...] | None = None):
        if num_steps < 2:
            raise ValueError(f"a search needs at least 2 steps, got {num_steps}")
        self.model = model
        self.adapter = adapter_for(model)
        self.granularity = granularity
        self.units = [u.name for u in self.adapter.units(model, granularity)]
        self.num_steps = num_steps
        self.levels = self.adapter.levels(model, granularity)
        self.by_name = {level.name: level for level in self.levels}
        self.param_names = [f"s{step:03d}" for step in range(1, num_steps)]
        if bits and quant is None:
            raise ValueError("per-unit bit widths need a quantization spec to vary")
        self.quant = quant
        self.bits = tuple(sorted({int(b) for b in bits}, reverse=True)) if bits else ()
        for b in self.bits:
            if b != 32 and not 2 <= b <= 8:
                raise ValueError(f"per-unit weight bits must lie in 2..8 (or 32 for float), got {b}")
            if quant.backend != "fake" and b not in (8, 32):
                raise ValueError(f"the {quant.backend} backend runs 8-bit weights only; search {b}-bit units with "
                                 "the fake backend")
        if self.bits:
            self.param_names += [f"b{u:02d}" for u in range(len(self.units))]
            paths = {module: name for name, module in model.named_modules()}
            self.unit_paths = [paths[u.module] for u in self.adapter.units(model, granularity)]

    # -- joint genomes: schedule genes, then (with bits) one bit width per unit -------------------
    def schedule(self, genome: Sequence[str]) -> tuple[str, ...]:
        return tuple(genome[: self.num_steps - 1])

    def unit_bits(self, genome: Sequence[str]) -> list[int]:
        """Weight bits of each unit (the spec's for all without per-unit genes; 32 outside a joint space)."""
        if self.bits:
            return [int(b) for b in genome[self.num_steps - 1:]]
        return [self.quant.weight_bits if self.quant else 32] * len(self.units)

    def complete(self, schedule: Sequence[str]) -> Genome:
        """A schedule-only genome with the spec's bits for every unit (unchanged outside a joint space)."""
        genome = tuple(schedule[: self.num_steps - 1])
        if self.bits:
            default = self.quant.weight_bits if self.quant.weight_bits in self.bits else self.bits[0]
            genome += (str(default),) * len(self.units)
        return genome

    def quant_spec(self, genome: Sequence[str]) -> QuantSpec | None:
        if self.quant is None:
            return None
        if not self.bits:
            return self.quant
        per_unit = {f"{path}.*": bits for path, bits in zip(self.unit_paths, self.unit_bits(genome))
                    if bits != self.quant.weight_bits}
        # the spec's own overrides (sensitive layers kept precise) come last: the last match wins
        return self.quant.model_copy(update={"overrides": {**per_unit, **self.quant.overrides}})

    # -- genomes, rows, plans --------------------------------------------------------------------
    def row(self, level: str) -> str:
        reused = self.by_name[level].reused
        return "".join("R" if u in reused else "C" for u in self.units)

    def rows(self, genome: Sequence[str]) -> list[str]:
        if len(genome) not in (self.num_steps - 1, len(self.param_names)):
            raise ValueError(f"a genome has {len(self.param_names)} genes, got {len(genome)}")
        return ["C" * len(self.units)] + [self.row(level) for level in self.schedule(genome)]

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
        return self.complete(genes)

    def plan(self, genome: Sequence[str], method: str = "search", params: dict | None = None) -> Plan:
        plan = make_plan(self.model, self.rows(genome), method, dict(params or {}), granularity=self.granularity)
        spec = self.quant_spec(genome)
        return plan if spec is None else plan.with_quant(spec)

    def bit_mac_fraction(self, genome: Sequence[str], unit_macs: Sequence[float]) -> float:
        """MACs weighted by weight bits / 32, as a share of the full-precision all-compute model (a
        bit-operations estimate: what quantization and caching save together). Layers outside the
        units count at the spec's bits."""
        base = self.quant.weight_bits if self.quant else 32
        total, units = unit_macs[0], unit_macs[1:]
        rest = total - sum(units)
        bits = self.unit_bits(genome)
        spent = sum(rest * base / 32 + sum(m * b / 32 for m, b, a in zip(units, bits, row) if a == "C")
                    for row in self.rows(genome))
        return spent / (total * self.num_steps)

    def all_compute(self) -> Genome:
        return self.complete(("C",) * (self.num_steps - 1))

    # -- optuna parameters -------------------------------------------------------------------------
    def params(self, genome: Sequence[str]) -> dict[str, str]:
        return dict(zip(self.param_names, genome))

    def from_params(self, params: dict) -> Genome | None:
        if any(name not in params for name in self.param_names):
            return None
        return tuple(params[name] for name in self.param_names)

    def distributions(self) -> dict:
        choices = tuple(level.name for level in self.levels)
        steps = {name: CategoricalDistribution(choices) for name in self.param_names[: self.num_steps - 1]}
        bits = tuple(str(b) for b in self.bits)
        return {**steps, **{name: CategoricalDistribution(bits) for name in self.param_names[self.num_steps - 1:]}}

    def describe(self) -> str:
        text = "; ".join(f"{level.name}: reuse {', '.join(u for u in self.units if u in level.reused) or 'nothing'}"
                         for level in self.levels)
        if self.quant is not None:
            text += (f"; quantized W{self.quant.weight_bits}A{self.quant.act_bits} ({self.quant.backend})"
                     + (f", per-unit weight bits from {', '.join(map(str, self.bits))}" if self.bits else ""))
        return text

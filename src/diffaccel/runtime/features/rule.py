"""The dynamic residual rule (first-block / dual-block caching): decide reuse per step at run time.

The first ``first_blocks`` units always compute; after the last of them, the relative L1 change of
their residual since the last computed step decides whether the units up to the last
``last_blocks`` are reused (or forecast) at this step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffaccel.adapters import Unit
from diffaccel.plan import Plan
from diffaccel.runtime.cache import primary
from diffaccel.runtime.features.base import Feature
from diffaccel.runtime.state import BranchState


@dataclass
class RuleState:
    decision: str = "C"  # the rule's choice for the skippable units at this step
    reference: torch.Tensor | None = None  # first blocks' residual at the last computed step
    head_input: torch.Tensor | None = None
    consecutive: int = 0


class ResidualRuleFeature(Feature):
    def __init__(self, plan: Plan, executor: Any) -> None:
        super().__init__(plan, executor)
        self.rule = plan.rule
        self.span = range(self.rule.first_blocks, len(plan.units) - self.rule.last_blocks)

    @classmethod
    def applies(cls, plan: Plan) -> bool:
        return plan.rule is not None

    @classmethod
    def part(cls, plan: Plan) -> Any:
        return plan.rule

    def before_forward(self, state: BranchState) -> None:
        state.of(self, RuleState).decision = "C"

    def action(self, state: BranchState, index: int, planned: str) -> str:
        return state.of(self, RuleState).decision if index in self.span else "C"

    def before_unit(self, state: BranchState, index: int, unit: Unit, args: tuple, kwargs: dict) -> None:
        if index == 0:
            inputs = unit.residual_inputs(args, kwargs) if unit.residual_inputs else None
            state.of(self, RuleState).head_input = primary(inputs) if inputs is not None else None

    def after_compute(self, state: BranchState, index: int, output: Any) -> None:
        if index == self.span.start - 1:
            self._decide(state, primary(output))

    def _decide(self, state: BranchState, head_output: torch.Tensor) -> None:
        rule, own = self.rule, state.of(self, RuleState)
        residual = head_output - own.head_input if own.head_input is not None else head_output
        can_skip = state.step >= rule.warmup and own.consecutive < rule.max_consecutive \
            and own.reference is not None and all(state.caches[i].ready for i in self.span)
        if can_skip:
            change = (residual - own.reference).abs().mean() / own.reference.abs().mean().clamp_min(1e-12)
            can_skip = float(change) < rule.threshold
        if can_skip:
            own.decision = "F" if rule.forecast_order > 0 else "R"
            own.consecutive += 1
        else:
            own.decision = "C"
            own.consecutive = 0
            own.reference = residual

"""ERTACache's residual correction: a reused residual ``r`` is served as ``gain[step] * r + bias[step]``."""

from __future__ import annotations

from typing import Any

import torch

from diffaccel.errors import PlanError
from diffaccel.plan import Plan
from diffaccel.runtime.cache import tree_map
from diffaccel.runtime.features.base import Feature


class ResidualCorrection(Feature):
    edits_served_values = True

    def __init__(self, plan: Plan, executor: Any) -> None:
        super().__init__(plan, executor)
        self.gain = plan.correction.gain
        # the fitted per-channel biases as tensors once, not on every reused unit of every step
        self.bias = [torch.tensor(row) for row in plan.correction.bias] if plan.correction.bias else []

    @classmethod
    def applies(cls, plan: Plan) -> bool:
        return plan.correction is not None

    @classmethod
    def part(cls, plan: Plan) -> Any:
        return plan.correction

    def serve(self, value: Any, step: int, index: int) -> Any:
        gain = self.gain[step]
        bias = self.bias[step] if self.bias else None

        biased = []

        def apply(v: torch.Tensor) -> torch.Tensor:
            out = v * gain
            if bias is not None and bias.numel() == v.shape[-1]:
                biased.append(v)
                out = out + bias.to(dtype=v.dtype, device=v.device)
            return out

        served = tree_map(apply, value)
        if bias is not None and not biased:
            raise PlanError(f"correction.bias has {bias.numel()} values per step, but unit "
                            f"{self.plan.units[index]}'s output has no last axis of that size at step {step}: "
                            "the plan was fitted on another model")
        return served

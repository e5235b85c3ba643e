"""CacheQuant's decoupled error correction: a reused (step, unit) is served as ``gain * v (+ bias)``,
per channel, with the fits the plan carries."""

from __future__ import annotations

from typing import Any

import torch

from diffaccel.errors import PlanError
from diffaccel.plan import Plan
from diffaccel.runtime.cache import tree_map
from diffaccel.runtime.features.base import Feature


class FeatureFitCorrection(Feature):
    edits_served_values = True

    def __init__(self, plan: Plan, executor: Any) -> None:
        super().__init__(plan, executor)
        fc = plan.feature_correction
        self.axis = fc.axis
        index = {name: i for i, name in enumerate(plan.units)}
        self.fits = {(f.step, index[f.unit]): (torch.tensor(f.gain), torch.tensor(f.bias) if f.bias else None)
                     for f in fc.fits}

    @classmethod
    def applies(cls, plan: Plan) -> bool:
        return plan.feature_correction is not None

    @classmethod
    def part(cls, plan: Plan) -> Any:
        return plan.feature_correction

    def serve(self, value: Any, step: int, index: int) -> Any:
        fit = self.fits.get((step, index))
        if fit is None:
            return value
        gain, bias = fit
        fitted = []

        def apply(v: torch.Tensor) -> torch.Tensor:
            dim = self.axis % v.dim()
            if v.shape[dim] != gain.numel():  # another leaf of a tuple output: left as it is
                return v
            fitted.append(v)
            shape = [1] * v.dim()
            shape[dim] = -1
            out = v * gain.to(v).reshape(shape)
            return out if bias is None else out + bias.to(v).reshape(shape)

        served = tree_map(apply, value)
        if not fitted:
            raise PlanError(f"feature_correction has {gain.numel()} gains at step {step}, unit "
                            f"{self.plan.units[index]}, but its output has no axis {self.axis} of that size: the "
                            "plan was fitted on another model")
        return served

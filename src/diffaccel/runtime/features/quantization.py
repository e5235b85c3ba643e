"""The plan's quantization section: quantized stand-ins for the denoiser's layers, built (and the
request checked) once, swapped in on every install and out on every remove."""

from __future__ import annotations

from typing import Any

from diffaccel.plan import Plan
from diffaccel.quant import Calibration, prepare
from diffaccel.runtime.features.base import Feature


class Quantization(Feature):
    def __init__(self, plan: Plan, executor: Any) -> None:
        super().__init__(plan, executor)
        calibration = Calibration.load(plan.quant.calibration)
        self.handle = prepare(executor.model, plan.quant, calibration, clock=lambda: executor.current_step)

    @classmethod
    def applies(cls, plan: Plan) -> bool:
        return plan.quant is not None

    @classmethod
    def part(cls, plan: Plan) -> Any:
        return plan.quant

    def install(self) -> None:
        self.handle.apply()

    def remove(self) -> None:
        self.handle.restore()

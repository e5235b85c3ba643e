"""The plan's quantization section: quantized stand-ins for the denoiser's layers, built (and the
request checked) once, swapped in on every install and out on every remove."""

from __future__ import annotations

import warnings
from typing import Any

from diffaccel.errors import PlanError
from diffaccel.plan import Plan
from diffaccel.quant import Calibration, prepare
from diffaccel.quant.layers import int8_matmul_speed
from diffaccel.runtime.features.base import Feature


class Quantization(Feature):
    def __init__(self, plan: Plan, executor: Any) -> None:
        super().__init__(plan, executor)
        calibration = Calibration.load(plan.quant.calibration)
        self.handle = prepare(executor.model, plan.quant, calibration, clock=lambda: executor.current_step)
        self.calibrated_steps = calibration.num_steps if plan.quant.per_step else None
        weight = next(executor.model.parameters(), None)
        if plan.quant.backend == "int8" and weight is not None and weight.device.type == "cpu" \
                and (speed := int8_matmul_speed()) < 1.0:
            warnings.warn(f"this CPU multiplies int8 matrices {1 / speed:.0f}x slower than float32 ones "
                          "(torch._int_mm): the int8 backend will run slower than float32 here; use the "
                          "int8-dynamic backend (fbgemm) on a CPU", stacklevel=2)

    @classmethod
    def applies(cls, plan: Plan) -> bool:
        return plan.quant is not None

    @classmethod
    def part(cls, plan: Plan) -> Any:
        return plan.quant

    def install(self) -> None:
        self.handle.apply()
        for _, _, _, layer in self.handle.replacements:  # the integer paths would round a NaN into a number
            layer.check_finite = self.executor.check_finite

    def start_run(self) -> None:
        """Per-step scales fit one step count only: another would quantize each step with another step's
        ranges (a plan that runs at any step count is no licence for that)."""
        steps = self.executor.clock.expected_steps
        if self.calibrated_steps is not None and steps is not None and steps != self.calibrated_steps:
            raise PlanError(f"this plan's quantization scales were calibrated per step for {self.calibrated_steps} "
                            f"steps but the pipeline runs {steps}: calibrate it again on {steps}-step calls, or "
                            "calibrate one scale per trajectory (per_step=False), which runs at any step count")

    def remove(self) -> None:
        self.handle.restore()

    def swapped(self) -> dict[int, Any]:
        return {id(original): new for _, _, original, new in self.handle.replacements}

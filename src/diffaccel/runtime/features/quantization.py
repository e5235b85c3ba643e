"""The plan's quantization section: quantized stand-ins for the denoiser's layers, built (and the
request checked) once, swapped in on every install and out on every remove."""

from __future__ import annotations

from typing import Any

from diffaccel.errors import CacheError, PlanError, PlanWarning, warn
from diffaccel.plan import Plan
from diffaccel.quant import Calibration, prepare
from diffaccel.quant.layers import int8_matmul_speed
from diffaccel.runtime.cache import all_finite
from diffaccel.runtime.features.base import Feature


def refuse_save(*args: Any, **kwargs: Any) -> None:
    """The model holds quantized stand-ins meanwhile: what it saves would not load as the model."""
    raise PlanError("the denoiser holds quantized layers while the plan is applied, and would save them in place of "
                    "its weights (a reload gives NaN): save the pipeline before applying the plan or after removing it")


def fused(module: Any) -> bool:
    """Whether diffusers' ``fuse_qkv_projections`` fused this attention's projections into one layer."""
    return bool(getattr(module, "fused_projections", False))


class Quantization(Feature):
    def __init__(self, plan: Plan, executor: Any) -> None:
        super().__init__(plan, executor)
        calibration = Calibration.load(plan.quant.calibration)
        self.handle = prepare(executor.model, plan.quant, calibration, clock=lambda: executor.current_step)
        self.calibrated_steps = calibration.num_steps if plan.quant.per_step else None
        self.integer = plan.quant.backend != "fake"
        weight = next(executor.model.parameters(), None)
        if plan.quant.backend == "int8" and weight is not None and weight.device.type == "cpu" \
                and (speed := int8_matmul_speed()) < 1.0:
            warn(f"this CPU multiplies int8 matrices {1 / speed:.0f}x slower than float32 ones "
                 "(torch._int_mm): the int8 backend will run slower than float32 here; use the "
                 "int8-dynamic backend (fbgemm) on a CPU")

    @classmethod
    def applies(cls, plan: Plan) -> bool:
        return plan.quant is not None

    @classmethod
    def part(cls, plan: Plan) -> Any:
        return plan.quant

    def install(self) -> None:
        self.fused_before = {id(parent) for parent, *_ in self.handle.replacements if fused(parent)}
        self.handle.apply()
        self.executor.patch(self.executor.model, "save_pretrained", refuse_save)

    def forward(self, original: Any, bound: Any, state: Any) -> None:
        """The integer paths round a NaN into a number, which the executor's check of the output would
        never see: under ``check_finite`` the model's inputs are checked instead (a check per int8
        layer cost 1.5x the run's time on the embedded DiT)."""
        if self.integer and self.executor.check_finite and not all_finite(dict(bound.arguments)):  # one sync
            name = next(name for name, value in bound.arguments.items() if not all_finite(value))
            raise CacheError(f"the model's input {name!r} holds a non-finite value (NaN or infinity) at step "
                             f"{state.step}, which the int8 layers would round into numbers: the input is broken; "
                             "the run was stopped")

    def start_run(self) -> None:
        """Per-step scales fit one step count only: another would quantize each step with another step's
        ranges (a plan that runs at any step count is no licence for that)."""
        steps = self.executor.clock.expected_steps
        if self.calibrated_steps is not None and steps is not None and steps != self.calibrated_steps:
            raise PlanError(f"this plan's quantization scales were calibrated per step for {self.calibrated_steps} "
                            f"steps but the pipeline runs {steps}: calibrate it again on {steps}-step calls, or "
                            "calibrate one scale per trajectory (per_step=False), which runs at any step count")

    def remove(self) -> None:
        if self.handle.applied and any(fused(parent) and id(parent) not in self.fused_before
                                       for parent, *_ in self.handle.replacements):
            warn(PlanWarning("fuse_qkv_projections ran while the quantized plan was applied: the fused layers hold "
                             "the quantized weights, rounded; call unfuse_qkv_projections() on the model (and fuse "
                             "again now, if you want): a quantized plan runs on the unfused model"))
        self.handle.restore()

    def swapped(self) -> dict[int, Any]:
        return {id(original): new for _, _, original, new in self.handle.replacements}

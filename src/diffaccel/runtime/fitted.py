"""What a calibrated plan was fitted with, checked where it is applied: other weights warn (and
refuse, for calibrated quantization), another scheduler warns. Such a plan runs, but the quality it
was measured at does not carry over."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from diffaccel.errors import PlanError, PlanWarning
from diffaccel.fingerprint import fingerprint
from diffaccel.plan import Plan


def check_weights(model: torch.nn.Module, plan: Plan) -> None:
    if plan.calibration is None:
        return
    found = fingerprint(model)
    if found != plan.calibration.weights:
        message = (f"this plan was fitted on other weights (fingerprint {plan.calibration.weights}) than this "
                   f"{type(model).__name__} has ({found})")
        if plan.quant is not None:
            raise PlanError(message + ": its quantization is calibrated for them; calibrate it for these "
                            "weights (`diffaccel quantize`)")
        warnings.warn(message + "; it runs, but its quality figures do not carry over: make it again for "
                      "these weights", PlanWarning, stacklevel=4)


def check_scheduler(plan: Plan, scheduler: Any) -> None:
    """A plan fitted under one scheduler's steps, run under another's (a plan with a solver section
    brings its own and is not asked)."""
    fitted = plan.calibration.scheduler if plan.calibration is not None else None
    if fitted is None or scheduler is None or plan.solver is not None or type(scheduler).__name__ == fitted:
        return
    warnings.warn(f"this plan was fitted with {fitted}; the pipeline runs {type(scheduler).__name__}: it runs, "
                  "but its quality figures do not carry over: make it again with this scheduler", PlanWarning,
                  stacklevel=4)

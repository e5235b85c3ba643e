"""What a plan was made for, checked where it is applied: other weights warn (and refuse, for
calibrated quantization), another scheduler warns (such a plan runs, but the quality it was measured
at does not carry over); another step count is refused or, when asked, mapped."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from diffaccel.errors import PlanError, PlanWarning, warn
from diffaccel.fingerprint import fingerprint, public_config
from diffaccel.plan import Plan

NOT_CARRIED = "but its quality figures do not carry over: make it again"
log = logging.getLogger("diffaccel")
# what a plan's solver reads off the pipeline's scheduler (its betas or flow shift, its spacing)
NOISE_SCHEDULE = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                  "rescale_betas_zero_snr", "timestep_spacing", "steps_offset", "shift", "use_dynamic_shifting",
                  "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "shift_terminal"}


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
        warn(message + "; it runs, but its quality figures do not carry over: make it again for "
             "these weights", PlanWarning)


def scheduler_settings(scheduler: Any) -> dict[str, Any] | None:
    """``scheduler``'s public config as JSON values (what a calibrated plan records of it)."""
    public = public_config(scheduler)  # infinities (DPM-Solver's lambda_min_clipped) as a plan file keeps them: null
    return None if public is None else json.loads(json.dumps(public, default=str), parse_constant=lambda _: None)


def check_scheduler(plan: Plan, scheduler: Any) -> None:
    """A plan fitted under one scheduler's steps, run under another's, or under the same class set
    otherwise (``timestep_spacing``, ``clip_sample``, ...); a plan with a solver section brings its
    own sampler, built on the pipeline's noise schedule: only a change there is reported."""
    fitted = plan.calibration.scheduler if plan.calibration is not None else None
    if fitted is None or scheduler is None:
        return
    if plan.solver is None and type(scheduler).__name__ != fitted:
        warn(f"this plan was fitted with {fitted}; the pipeline runs {type(scheduler).__name__}: it "
             f"runs, {NOT_CARRIED} with this scheduler", PlanWarning)
        return
    recorded, found = plan.calibration.scheduler_config, scheduler_settings(scheduler)
    if recorded is None or found is None:
        return
    keys = recorded.keys() & found.keys() & (NOISE_SCHEDULE if plan.solver is not None else recorded.keys())
    changed = sorted(key for key in keys if recorded[key] != found[key])
    if changed:
        settings = ", ".join(f"{key}={found[key]!r} (fitted with {recorded[key]!r})" for key in changed)
        what = "a noise schedule" if plan.solver is not None else f"{fitted}"
        warn(f"this plan was fitted with {what} set otherwise than the pipeline's: {settings}; it runs, "
             f"{NOT_CARRIED} with these settings", PlanWarning)


def plan_for_run(source: Plan, steps: int, schedule: int, resample: bool) -> Plan:
    """``source`` for a run of ``steps`` denoiser evaluations (the last ``steps`` of a ``schedule``-step
    schedule for an image-to-image call): as it is, mapped (``Plan.resample``) when ``resample``, or refused."""
    if source.step_free or source.num_steps == steps:
        return source
    if not resample:
        tail = f", the last {steps} of its {schedule}-step schedule" if schedule > steps else ""
        raise PlanError(f"the plan is for {source.num_steps} steps but the pipeline runs {steps} (denoiser "
                        f"evaluations of this call{tail}): make the plan for {steps} steps, or map it with "
                        f"plan.resample({steps}) / accelerate(..., resample=True)")
    mapped = source.resample(steps)  # refuses a plan that cannot be mapped, before the log says it was
    log.warning("plan %s made for %d steps, mapped to %d steps of this run (Plan.resample)", source.method,
                source.num_steps, steps)
    return mapped

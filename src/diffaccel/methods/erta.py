"""ERTACache: choose reusable steps from an offline residual profile, and correct what reuse gets
wrong with per-step factors fitted on a few calibration runs.

1. Profiling: full-compute runs of the calibration workload record, per step, the residual of the
   whole block stack (last block's output minus first block's input) and the model output; the
   relative change of the output between steps is the profile.
2. Step selection: walking the steps, the profiled change accumulates since the last computed
   step; a step is reused while the sum stays under ``threshold`` (with warm-up steps and a cap
   on consecutive reuses).
3. Residual correction (transformers): for each reused step, ``r_t ~ K_t * r_cached + B_t`` fitted
   in closed form (least squares; ``K`` a scalar, ``B`` per channel, shared over the units).
4. Trajectory-aware step adjustment: a factor per reused step scales the solver's update, fitted
   so that the accelerated calibration run's update at that step matches the full run's update.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pydantic import Field

from diffaccel.adapters import adapter_for, find_denoiser
from diffaccel.calibration.record import trajectories
from diffaccel.calibration.reference import calibration_info
from diffaccel.calibration.workload import Workload, calibration_workload
from diffaccel.errors import MethodError
from diffaccel.methods.base import Method, Settings, make_plan, rows_from, unit_names
from diffaccel.plan import Correction, Plan


class ErtaSettings(Settings):
    threshold: float = Field(0.15, gt=0, description="reuse while the accumulated profiled change stays under it")
    warmup: int = Field(3, ge=0, description="leading steps that always compute")
    max_consecutive: int = Field(3, ge=0, description="cap on consecutive reused steps")
    correct: bool = Field(True, description="fit the per-step residual correction (transformers)")
    adjust_steps: bool = Field(False, description="fit per-step scales of the solver update")


def select_steps(profile: list[float], threshold: float, warmup: int, max_consecutive: int) -> set[int]:
    """Steps to compute: accumulate the profiled change since the last computed step."""
    keys, acc, run = set(), 0.0, 0
    for step, change in enumerate(profile):
        acc += change
        if step < warmup or acc >= threshold or run >= max_consecutive:
            keys.add(step)
            acc, run = 0.0, 0
        else:
            run += 1
    return keys


def fit_correction(residuals: list[torch.Tensor], keys: set[int], n_units: int) -> Correction:
    gain, bias, last = [], [], 0
    for step, r in enumerate(residuals):
        if step in keys:
            last = step
            gain.append(1.0)
            bias.append([0.0] * r.shape[-1])
            continue
        cached = residuals[last]
        k = float((r * cached).sum() / (cached * cached).sum().clamp_min(1e-12))
        b = (r - k * cached).reshape(-1, r.shape[-1]).mean(0) / n_units
        gain.append(k)
        bias.append(b.tolist())
    return Correction(gain=gain, bias=bias)


def fit_step_scale(full: list[torch.Tensor], fast: list[torch.Tensor], keys: set[int]) -> list[float]:
    """Per reused step, the factor that best maps the accelerated run's update onto the full run's
    update at the same step (least squares over the calibration images), kept within +-20%."""
    scales = []
    for step in range(len(full)):
        if step in keys or step + 1 >= len(full):
            scales.append(1.0)
            continue
        taken = fast[step + 1] - fast[step]
        wanted = full[step + 1] - full[step]
        phi = float((wanted * taken).sum() / (taken * taken).sum().clamp_min(1e-12))
        scales.append(min(1.2, max(0.8, phi)))
    return scales


@torch.no_grad()
def build(pipe: Any, workload: Workload, s: ErtaSettings) -> Plan:
    model, _ = find_denoiser(pipe)
    units = adapter_for(model).units(model)
    full = trajectories(pipe, workload)
    outputs = full["output"]
    if len({tuple(o.shape) for o in outputs}) > 1:
        raise MethodError("the calibration calls change the model's batch mid-run (a callback that drops guidance): "
                          "erta compares each step's output with the step before's; calibrate on calls without it")
    profile = [0.0] + [float((b - a).abs().mean() / a.abs().mean().clamp_min(1e-12))
                       for a, b in zip(outputs, outputs[1:])]
    steps = len(outputs)
    keys = select_steps(profile, s.threshold, s.warmup, s.max_consecutive)
    names = unit_names(model)
    cached = adapter_for(model).default_reused(model)
    rows = rows_from(steps, names, keys, cached)
    params = {"threshold": s.threshold, "warmup": s.warmup, "max_consecutive": s.max_consecutive,
              "calibration_calls": len(workload), "profile": [round(p, 5) for p in profile]}
    correction = None
    if s.correct and units[0].residual_inputs is not None and len(cached) == len(names) and full["residual"]:
        correction = fit_correction(full["residual"], keys, len(names))
    info = calibration_info(model, workload, len(full["latent"][0]), steps, pipe)
    plan = make_plan(model, rows, "erta", params, correction=correction, calibration=info)
    if s.adjust_steps:
        fast = trajectories(pipe, workload, plan)
        plan = Plan.model_validate({**plan.model_dump(), "step_scale": fit_step_scale(full["latent"], fast["latent"],
                                                                                          keys)})
    return plan


ERTA = Method("erta", "profiled reuse steps with fitted residual correction (ERTACache)", ErtaSettings, build,
              calibrated=True)


def erta(pipe: Any, calls: Workload | Iterable[dict] | None = None, **settings: Any) -> Plan:
    """An ERTACache plan fitted on ``calls`` (the embedded pipelines' default workload if None);
    settings: ``ErtaSettings``."""
    return ERTA.build(pipe, calibration_workload(calls, pipe), ERTA.make_settings(**settings))

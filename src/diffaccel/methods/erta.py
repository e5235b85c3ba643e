"""ERTACache: choose reusable steps from an offline residual profile, and correct what reuse gets
wrong with per-step factors fitted on a few calibration runs.

1. Profiling: full-compute calibration runs record, per step, the residual of the whole block
   stack (last block's output minus first block's input) and the model output; the relative
   change of the output between steps is the profile.
2. Step selection: walking the steps, the profiled change accumulates since the last computed
   step; a step is reused while the sum stays under ``threshold`` (with warm-up steps and a cap
   on consecutive reuses).
3. Residual correction (transformers): for each reused step, ``r_t ~ K_t * r_cached + B_t`` fitted
   in closed form (least squares; ``K`` a scalar, ``B`` per channel, shared over the units).
4. Trajectory-aware step adjustment: a factor per reused step scales the solver's update, fitted
   so that the accelerated calibration run's update at that step matches the full run's update.
"""

from __future__ import annotations

import torch

from diffaccel.adapters import adapter_for
from diffaccel.methods.base import calibration_batch, make_plan, rows_from, unit_names
from diffaccel.methods.block_cache import default_cached_units
from diffaccel.plan import Correction, Plan
from diffaccel.runtime.cache import primary


def _record_run(pipe, labels, gens, num_steps: int, guidance: float, units, plan: Plan | None = None):
    """One sampling run that records, per step: stack residual, model output and latent."""
    import diffaccel

    record = {"residual": [], "output": [], "latent": []}
    first, last = units[0].module, units[-1].module
    handles = []
    if units[0].residual_inputs is not None:
        handles.append(first.register_forward_pre_hook(
            lambda m, a, k: record.__setitem__("head", primary(units[0].residual_inputs(a, k))), with_kwargs=True))
        handles.append(last.register_forward_hook(
            lambda m, a, k, out: record["residual"].append(primary(out) - record["head"]), with_kwargs=True))
    model = pipe.denoiser
    handles.append(model.register_forward_hook(
        lambda m, a, out: record["output"].append((out.sample if hasattr(out, "sample") else out[0]).clone())))
    step_fn = pipe.scheduler.step

    def step(model_output, timestep, sample, *args, **kwargs):
        record["latent"].append(sample.clone())
        return step_fn(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = step
    try:
        if plan is None:
            images = pipe(labels, num_inference_steps=num_steps, guidance_scale=guidance, generator=gens).images
        else:
            with diffaccel.accelerate(pipe, plan):
                images = pipe(labels, num_inference_steps=num_steps, guidance_scale=guidance, generator=gens).images
    finally:
        del pipe.scheduler.step
        for handle in handles:
            handle.remove()
    record["final"] = images
    return record


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


def _fit_correction(residuals: list[torch.Tensor], keys: set[int], n_units: int) -> Correction:
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


def _fit_step_scale(full: list[torch.Tensor], fast: dict, keys: set[int]) -> list[float]:
    """Per reused step, the factor that best maps the accelerated run's update onto the full run's
    update at the same step (least squares over the calibration images), kept within +-20%."""
    fast_latents = fast["latent"]
    scales = []
    for step in range(len(full)):
        if step in keys or step + 1 >= len(full):
            scales.append(1.0)
            continue
        taken = fast_latents[step + 1] - fast_latents[step]
        wanted = full[step + 1] - full[step]
        phi = float((wanted * taken).sum() / (taken * taken).sum().clamp_min(1e-12))
        scales.append(min(1.2, max(0.8, phi)))
    return scales


@torch.no_grad()
def erta(pipe, num_steps: int = 50, threshold: float = 0.15, warmup: int = 3, max_consecutive: int = 3,
         correct: bool = True, adjust_steps: bool = False, guidance: float = 3.0, classes: list[int] | None = None,
         per_class: int = 2, seed: int = 0) -> Plan:
    """Profile ``per_class`` calibration runs per class (seeds disjoint from evaluation seeds) and
    return the plan, with its profile in ``params``."""
    model = pipe.denoiser
    units = adapter_for(model).units(model)
    labels, gens = calibration_batch(pipe, classes, per_class, seed)
    full = _record_run(pipe, labels, gens, num_steps, guidance, units)
    outputs = full["output"]
    profile = [0.0] + [float((b - a).abs().mean() / a.abs().mean().clamp_min(1e-12))
                       for a, b in zip(outputs, outputs[1:])]
    keys = select_steps(profile, threshold, warmup, max_consecutive)
    names = unit_names(model)
    cached = default_cached_units(model, "block", None)
    rows = rows_from(num_steps, names, keys, cached)
    params = {"threshold": threshold, "warmup": warmup, "max_consecutive": max_consecutive,
              "calibration_images": len(labels), "profile": [round(p, 5) for p in profile]}
    correction = None
    if correct and units[0].residual_inputs is not None and len(cached) == len(names):
        correction = _fit_correction(full["residual"], keys, len(names))
    plan = make_plan(model, rows, "erta", params, correction=correction)
    if adjust_steps:
        labels, gens = calibration_batch(pipe, classes, per_class, seed)
        fast = _record_run(pipe, labels, gens, num_steps, guidance, units, plan)
        plan = plan.model_copy(update={"step_scale": _fit_step_scale(full["latent"], fast, keys)})
        plan = Plan.model_validate(plan.model_dump())
    return plan

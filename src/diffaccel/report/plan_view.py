"""``diffaccel plan show``: a step x unit map of a plan and what it costs."""

from __future__ import annotations

import torch

from diffaccel.adapters import adapter_for
from diffaccel.errors import PlanError
from diffaccel.eval.cost import plan_mac_fraction, predicted_steps_saved
from diffaccel.fingerprint import fingerprint
from diffaccel.plan import Plan
from diffaccel.quant.calibrate import Calibration
from diffaccel.runtime.executor import Executor
from diffaccel.targets import Target, load_target

SYMBOLS = {"C": "#", "R": ".", "F": "~"}
# the shipped models by their denoiser's adapter (the SD pipeline's U-Net has the embedded U-Net's unit names)
SHIPPED = {"dit": "dit", "unet": "unet", "sd": "unet", "pixart": "pixart"}


def shipped_unit_macs(plan: Plan, model: str | None) -> list[tuple[str, list[int]]]:
    """``(model, per-sample MACs of its denoiser's units)`` for each shipped model the plan fits (only
    the one named, if any): a static plan of the U-Net's units fits the embedded U-Net and SD's alike."""
    if model is not None and SHIPPED.get(model) != plan.adapter:
        fits = [m for m, adapter in SHIPPED.items() if adapter == plan.adapter]
        known = "" if model in SHIPPED else f" (shipped models: {', '.join(SHIPPED)})"
        raise PlanError(f"this plan is for a {plan.model_class} (the {plan.adapter} adapter), not the shipped {model} "
                        f"model{known}: drop --model" + (f" or give --model {' or '.join(fits)}" if fits else ""))
    fitted = plan.calibration.weights if plan.calibration is not None else None
    measured = []
    for name in [model] if model else [m for m, adapter in SHIPPED.items() if adapter == plan.adapter]:
        target = load_target(name)
        denoiser = target.denoiser()[0]
        units = [u.name for u in adapter_for(denoiser).units(denoiser, plan.granularity)]
        if units == list(plan.units) and (model or not fitted or fitted == fingerprint(denoiser)):
            measured.append((name, _probe_unit_macs(plan, target)))
    return measured


def _probe_unit_macs(plan: Plan, target: Target) -> list[int]:
    """Every unit's per-sample MACs, from one all-compute step of ``target``'s pipeline."""
    denoiser, scheduler = target.denoiser()
    probe = plan.model_copy(update={"schedule": ["C" * len(plan.units)], "num_steps": 1, "rule": None,
                                    "timesteps": None, "correction": None, "step_scale": None,
                                    "noise_injection": None, "parallel_decode": False, "solver": None,
                                    "feature_correction": None, "precision": None, "guidance": None})
    call = {"class_labels": [0]} if target.embedded else target.calls[0]
    executor = Executor(denoiser, probe)
    executor.install(scheduler)
    try:
        target.pipe(**{**call, "num_inference_steps": 1, "guidance_scale": 1.0},
                    generator=torch.Generator().manual_seed(0))
    finally:
        executor.remove()
    return next(iter(executor.unit_macs.values()))


def _whole_run(plan: Plan) -> list[str]:
    """The plan's parts that act on the whole run: its sampler, quantization and precision."""
    lines = []
    if plan.solver is not None:
        lines.append(f"sampler: {plan.solver.label} (replaces the pipeline's own while the plan is applied)")
    if plan.quant is not None:
        lines.append(f"quantized: {plan.quant.label}, {plan.quant.backend} backend")
    if plan.precision is not None:
        lines.append(f"precision: the denoiser runs under autocast to {plan.precision}")
    if plan.guidance is not None:
        steps = ", ".join(str(s) for s in sorted(plan.guidance.predicted))
        lines.append(f"guidance: at step {steps} the denoiser runs the conditional half of the guidance batch; the "
                     f"{plan.guidance.unconditional} (unconditional) half is predicted from fitted weights")
    return lines


def _step_count(plan: Plan) -> str:
    """At how many steps a plan without a schedule runs."""
    if plan.quant is not None and plan.quant.per_step:  # made by --quant-per-step, it records no calibration
        calibrated = plan.calibration
        steps = calibrated.steps if calibrated is not None else Calibration.load(plan.quant.calibration).num_steps
        return f"only at the {steps} steps its per-step quantization scales were calibrated for"
    if plan.solver is not None:
        return f"its solver's {plan.solver.steps}, whatever the pipeline is called with"
    return "any number of steps"


def render_plan(plan: Plan, model: str | None = None) -> str:
    settings = {k: v for k, v in plan.params.items() if k != "profile"}
    lines = [f"plan: {plan.method} {settings}",
             f"model: {plan.model_class} ({plan.adapter} adapter, {len(plan.units)} {plan.granularity} units)"]
    lines += _whole_run(plan)
    if plan.schedule is None and plan.rule is None:
        cost = "the full model's MACs" + ("" if plan.guidance is None else ", half at the predicted steps")
        if plan.solver is not None and plan.solver.bottleneck is not None:
            cost += (f", about 1/{plan.solver.scale ** 2} of them at the {plan.solver.bottleneck[1]} "
                     "reduced-resolution steps")
        lines.append(f"every unit computes at every step ({_step_count(plan)}); cost: {cost}")
        return "\n".join(lines)
    if plan.schedule is None:
        rule = plan.rule
        lines.append(f"runtime rule: first {rule.first_blocks} and last {rule.last_blocks} units always compute; "
                     f"the others are {'forecast' if rule.forecast_order else 'reused'} while the first blocks' "
                     f"residual changes by < {rule.threshold:g} (warm-up {rule.warmup} steps, at most "
                     f"{rule.max_consecutive} in a row)")
        lines.append("cost: decided at run time (see the record of a run)")
        return "\n".join(lines)
    fitted_with = plan.calibration.scheduler if plan.calibration is not None else None
    steps = f"{plan.num_steps} " + ("evaluations of that sampler" if plan.solver is not None
                                    else f"{fitted_with} denoiser evaluations" if fitted_with
                                    else "denoiser evaluations")
    lines.append(f"{steps}; # compute, . reuse, ~ forecast"
                 + ("; parallel decoding on" if plan.parallel_decode else ""))
    width = max(len(u) for u in plan.units)
    for row_index in range(width):
        label = "".join(u.rjust(width)[row_index] for u in plan.units)
        lines.append(f"{'':>5} {label}")
    for step, row in enumerate(plan.schedule):
        lines.append(f"{step:>5} {''.join(SYMBOLS[a] for a in row)}")
    counts = plan.counts()
    lines.append(f"actions: {counts['compute']} compute, {counts['reuse']} reuse, {counts['forecast']} forecast")
    if plan.solver is not None and plan.solver.bottleneck is not None:  # what the schedule's letters cannot tell
        lines.append(f"MACs: {plan.solver.bottleneck[1]} steps run at reduced resolution, and a unit cannot reuse "
                     "across a change of resolution: measure the plan on its model (generate --plan ... --compare)")
        return "\n".join(lines)
    measured = shipped_unit_macs(plan, model)
    if not measured:
        lines.append("MACs: the plan does not fit a shipped model; apply it to its model to count them")
    for name, unit_macs in measured:
        fraction = plan_mac_fraction(plan, unit_macs) - predicted_steps_saved(plan) / plan.num_steps
        lines.append(f"MACs: {fraction:.1%} of the full model ({1 / fraction:.2f}x fewer), measured on the shipped "
                     f"{name} model's denoiser" + (" (over the plan's own steps: the pipeline's sampler may run more)"
                                                   if plan.solver is not None else ""))
    return "\n".join(lines)

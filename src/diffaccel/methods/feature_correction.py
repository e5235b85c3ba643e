"""Per-channel linear correction of cached features (CacheQuant's decoupled error correction).

A static plan serves a unit's value at a reused step from the step it last computed. One
calibration pass runs the plan itself (quantized, if it carries a quantization section) and, at
every reused (step, unit), also computes the unit on the input it actually receives there. Per
channel, least squares then fits ``computed ~ gain * served`` (``+ bias`` with ``bias=True``): a map
learnt on the accelerated trajectory, so it corrects what reuse gets wrong where the plan will run.
On the embedded DiT a gain alone generalises better to held-out seeds than gain and bias (which fit
the calibration images more closely), hence the default. Units whose value is not a single tensor
(U-Net down blocks also return their skips) are left as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from diffaccel.adapters import find_denoiser
from diffaccel.calibration.record import run_each
from diffaccel.calibration.workload import Workload, calibration_workload
from diffaccel.errors import MethodError, PlanWarning, warn
from diffaccel.methods.base import unit_names
from diffaccel.plan import FeatureCorrection, FeatureFit, Plan

GAIN_RANGE = (0.5, 1.5)  # a fit outside it is an artefact of too little calibration data


def _sums(stats: dict, key: tuple[int, int], served: torch.Tensor, computed: torch.Tensor, axis: int) -> None:
    xs, ys = (t.movedim(axis, -1).reshape(-1, t.shape[axis]).double() for t in (served, computed))
    sums = [xs.sum(0), ys.sum(0), (xs * ys).sum(0), (xs * xs).sum(0), torch.tensor(float(len(xs)))]
    stats[key] = sums if key not in stats else [a + b for a, b in zip(stats[key], sums)]


def _fit(units: list[str], stats: dict, bias: bool) -> list[FeatureFit]:
    fits = []
    for (step, u), (sx, sy, sxy, sxx, n) in sorted(stats.items()):
        if bias:
            var = n * sxx - sx * sx
            gain = torch.where(var > 1e-12 * n * n, (n * sxy - sx * sy) / var.clamp_min(1e-30), torch.ones_like(sx))
        else:
            gain = torch.where(sxx > 1e-30, sxy / sxx.clamp_min(1e-30), torch.ones_like(sx))
        gain = gain.clamp(*GAIN_RANGE)
        offset = [round(float(b), 6) for b in (sy - gain * sx) / n] if bias else []
        fits.append(FeatureFit(step=step, unit=units[u], gain=[round(float(g), 5) for g in gain], bias=offset))
    return fits


@torch.no_grad()
def fit_feature_correction(pipe: Any, plan: Plan, calls: Workload | Iterable[dict] | None = None,
                           bias: bool = False) -> Plan:
    """``plan`` with a ``feature_correction`` fitted on the calibration workload ``calls`` (the
    embedded pipelines' default one if None)."""
    if plan.schedule is None:
        raise MethodError("a feature correction needs a static plan (a schedule of reused steps)")
    workload = calibration_workload(calls, pipe, num_steps=plan.num_steps)
    model, _ = find_denoiser(pipe)
    if unit_names(model, plan.granularity) != plan.units:
        raise MethodError("the plan was made for other units than this model's")
    stats: dict[tuple[int, int], list[torch.Tensor]] = {}
    current: dict[str, Any] = {}
    handles = []

    def hook(module, args, kwargs, output, index, unit):
        executor = current["executor"]
        step = executor.current_step
        if step is None or not isinstance(output, torch.Tensor) or plan.schedule[step][index] == "C":
            return
        computed = type(module).forward(module, *args, **kwargs)  # past the executor's patch
        base = unit.residual_inputs(args, kwargs) if unit.residual_inputs is not None else 0
        _sums(stats, (step, index), output - base, computed - base, executor.adapter.channel_axis)

    def start(executor) -> None:
        current["executor"] = executor
        if not handles:
            for index, unit in enumerate(executor.units):
                handles.append(unit.module.register_forward_hook(
                    lambda m, a, k, out, i=index, u=unit: hook(m, a, k, out, i, u), with_kwargs=True))

    try:  # each reused unit served on its own (no merged runs), so its served value is its own cache
        executor = run_each(pipe, workload, plan, start, merge_runs=False, resample=False)
    finally:
        for handle in handles:
            handle.remove()
    fits = _fit(plan.units, stats, bias)
    if not fits:  # nothing to correct: the plan as it was, so that its output stays exactly the same
        why = ("reuses no unit" if not plan.served_units() else
               f"reuses only units that return several tensors on a {type(model).__name__} (such as joint text "
               "and image streams), which a per-channel correction does not handle")
        warn(PlanWarning(f"no feature correction was fitted: the plan {why}; it is returned without one"))
        return plan
    params = {**plan.params, "feature_correction": {"calibration_calls": len(workload), "fits": len(fits)}}
    correction = FeatureCorrection(axis=executor.adapter.channel_axis, fits=fits)
    corrected = plan.model_copy(update={"feature_correction": correction, "params": params})
    return Plan.model_validate(corrected.model_dump())

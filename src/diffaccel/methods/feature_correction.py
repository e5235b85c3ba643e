"""Per-channel linear correction of cached features (CacheQuant's decoupled error correction).

A static plan serves a unit's value at a reused step from the step it last computed. One
calibration pass runs the plan itself (quantized, if it carries a quantization section) and, at
every reused (step, unit), also computes the unit on the input it actually receives there. Per
channel, least squares then fits ``computed ~ gain * served`` (``+ bias`` with ``bias=True``): a map
learnt on the accelerated trajectory, so it corrects what reuse gets wrong where the plan will run.
On the embedded DiT a gain alone generalises better to held-out seeds than gain and bias (which fit
the calibration images more closely), hence the default. Units whose
value is not a single tensor (U-Net down blocks also return their skips) are left as they are.
"""

from __future__ import annotations

import torch

from diffaccel.adapters import adapter_for
from diffaccel.methods.base import calibration_batch
from diffaccel.plan import FeatureCorrection, FeatureFit, Plan

GAIN_RANGE = (0.5, 1.5)  # a fit outside it is an artefact of too little calibration data


@torch.no_grad()
def fit_feature_correction(pipe, plan: Plan, guidance: float = 3.0, per_class: int = 1, seed: int = 0,
                           bias: bool = False) -> Plan:
    """``plan`` with a ``feature_correction`` fitted on ``per_class`` calibration images per class."""
    import diffaccel

    if plan.schedule is None:
        raise ValueError("a feature correction needs a static plan (a schedule of reused steps)")
    model = pipe.denoiser
    adapter = adapter_for(model)
    units = adapter.units(model, plan.granularity)
    if [u.name for u in units] != plan.units:
        raise ValueError("the plan was made for other units than this model's")
    axis = 1 if adapter.name == "unet" else -1
    stats: dict[tuple[int, int], list[torch.Tensor]] = {}
    labels, gens = calibration_batch(pipe, None, per_class, seed)
    handles = []
    # an empty correction keeps every reused unit on its own (no merged runs of residual units),
    # so that each unit's served value is its own cached residual
    unmerged = plan.model_copy(update={"feature_correction": FeatureCorrection(axis=axis, fits=[])})
    with diffaccel.accelerate(pipe, unmerged) as executor:
        def hook(module, args, kwargs, output, index, unit):
            step = executor.current_step
            if step is None or not isinstance(output, torch.Tensor) or plan.schedule[step][index] == "C":
                return
            computed = type(module).forward(module, *args, **kwargs)  # past the executor's patch
            base = unit.residual_inputs(args, kwargs) if unit.residual_inputs is not None else 0
            x, y = output - base, computed - base
            xs, ys = (t.movedim(axis, -1).reshape(-1, t.shape[axis]).double() for t in (x, y))
            sums = [xs.sum(0), ys.sum(0), (xs * ys).sum(0), (xs * xs).sum(0), torch.tensor(float(len(xs)))]
            key = (step, index)
            stats[key] = sums if key not in stats else [a + b for a, b in zip(stats[key], sums)]

        for index, unit in enumerate(units):
            handles.append(unit.module.register_forward_hook(
                lambda m, a, k, out, i=index, u=unit: hook(m, a, k, out, i, u), with_kwargs=True))
        try:
            pipe(labels, num_inference_steps=plan.num_steps, guidance_scale=guidance, generator=gens)
        finally:
            for handle in handles:
                handle.remove()
    fits = []
    for (step, u), (sx, sy, sxy, sxx, n) in sorted(stats.items()):
        if bias:
            var = n * sxx - sx * sx
            gain = torch.where(var > 1e-12 * n * n, (n * sxy - sx * sy) / var.clamp_min(1e-30), torch.ones_like(sx))
        else:
            gain = torch.where(sxx > 1e-30, sxy / sxx.clamp_min(1e-30), torch.ones_like(sx))
        gain = gain.clamp(*GAIN_RANGE)
        offset = [round(float(b), 6) for b in (sy - gain * sx) / n] if bias else []
        fits.append(FeatureFit(step=step, unit=plan.units[u], gain=[round(float(g), 5) for g in gain], bias=offset))
    params = {**plan.params, "feature_correction": {"calibration_images": len(labels), "fits": len(fits)}}
    correction = FeatureCorrection(axis=axis, fits=fits)
    corrected = plan.model_copy(update={"feature_correction": correction, "params": params})
    return Plan.model_validate(corrected.model_dump())

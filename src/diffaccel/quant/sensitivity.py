"""Which layers does quantization hurt most? Quantize one layer at a time and measure how far the
denoiser's output moves, on inputs recorded along calibration trajectories."""

from __future__ import annotations

import torch
from tqdm import tqdm

from diffaccel.quant.apply import layer_bits, quantize_
from diffaccel.quant.calibrate import Calibration, quantizable
from diffaccel.quant.spec import FULL_PRECISION, QuantSpec


def _output(model, step: int, args, kwargs, clock: dict) -> torch.Tensor:
    clock["step"] = step
    out = model(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out.sample


@torch.no_grad()
def sensitivity(model: torch.nn.Module, spec: QuantSpec, calibration: Calibration, calls: list,
                progress: bool = True) -> list[dict]:
    """Every quantizable layer with the relative output error it adds alone at the weight bits the spec
    gives it (its overrides included; a layer they keep in floating point is listed as kept, with no
    error), worst first; ``calls`` are the denoiser's recorded ``(step, args, kwargs)``
    (``calibration.record.denoiser_calls``)."""
    clock: dict = {"step": None}
    reference = [_output(model, step, args, kwargs, clock) for step, args, kwargs in calls]
    names = list(quantizable(model))
    widths = layer_bits(spec, names, dict(model.named_modules()))
    rows = [{"layer": name, "bits": FULL_PRECISION, "relative_error": None, "kept": True}
            for name in names if widths[name] == FULL_PRECISION]
    measured = []
    for name in tqdm([n for n in names if widths[n] != FULL_PRECISION], desc="sensitivity", disable=not progress):
        alone = spec.model_copy(update={"overrides": {"*": FULL_PRECISION, name: widths[name]}})
        handle = quantize_(model, alone, calibration, clock=lambda: clock["step"])
        try:
            errors = [float((_output(model, step, args, kwargs, clock) - ref).pow(2).mean() / ref.pow(2).mean())
                      for (step, args, kwargs), ref in zip(calls, reference)]
        finally:
            handle.restore()
        measured.append({"layer": name, "bits": widths[name], "relative_error": sum(errors) / len(errors)})
    return sorted(measured, key=lambda r: r["relative_error"], reverse=True) + rows

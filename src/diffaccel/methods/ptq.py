"""Timestep-aware post-training quantization (PTQ4DM / Q-Diffusion) as a plan producer.

``ptq(pipe)`` calibrates the denoiser's layer ranges on calibration runs (seeds disjoint from any
evaluation seeds), saves them as safetensors and returns an all-compute plan with a quantization
section. ``plan.with_quant(quant_spec(pipe, ...))`` adds the same section to any caching plan.
A calibration for the same model, steps, guidance and inputs is reused from its file.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from pydantic import ValidationError

from diffaccel.methods.base import make_plan, unit_names
from diffaccel.plan import Plan
from diffaccel.quant.calibrate import Calibration, QuantError, calibrate, fingerprint
from diffaccel.quant.spec import FULL_PRECISION, QuantSpec

# Layers that carry the timestep or touch pixels directly: one step more precise than the rest
# (QuEST: time-embedding layers are the most sensitive at low bit widths).
SENSITIVE = ("*timestep_embedder*", "*time_embedding*", "pos_embed.proj", "proj_out_2", "conv_in", "conv_out")


def parse_bits(bits: str) -> tuple[int, int]:
    match = re.fullmatch(r"[wW](\d+)[aA](\d+)", bits.strip())
    if not match:
        raise ValueError(f"bits must look like w8a8 or w4a8, got {bits!r}")
    return int(match[1]), int(match[2])


def default_overrides(weight_bits: int, model) -> dict[str, int]:
    """Below 8-bit weights, the sensitive layers of this model stay at 8 bits."""
    if weight_bits >= 8:
        return {}
    from fnmatch import fnmatchcase

    from diffaccel.quant.calibrate import quantizable

    names = list(quantizable(model))
    return {p: 8 for p in SENSITIVE if any(fnmatchcase(n, p) for n in names)}


def calibration_for(pipe, num_steps: int, guidance: float, act_bits: int, per_class: int, seed: int,
                    path: str | Path | None = None, progress: bool = False) -> Path:
    """The calibration file for these settings: loaded if it exists and fits, else made."""
    from diffaccel.methods.base import calibration_batch

    model = pipe.denoiser
    if path is None:
        folder = Path(tempfile.gettempdir()) / "diffaccel-calibration"
        folder.mkdir(exist_ok=True)
        name = f"{fingerprint(model)}-{num_steps}steps-g{guidance:g}-n{per_class}-s{seed}-A{act_bits}"
        path = folder / f"{name}.safetensors"
    path = Path(path)
    if path.exists():
        try:
            Calibration.load(path).check(model, act_bits)
            return path
        except QuantError:
            pass  # stale or foreign: calibrate again
    labels, gens = calibration_batch(pipe, None, per_class, seed)
    seeds = [g.initial_seed() for g in gens]
    calibrate(pipe, labels, seeds, num_steps, guidance, act_bits, progress=progress).save(path)
    return path


def quant_spec(pipe, num_steps: int = 50, bits: str = "w8a8", backend: str = "fake", per_step: bool = False,
               overrides: dict[str, int] | None = None, guidance: float = 3.0, per_class: int = 2, seed: int = 0,
               calibration: str | None = None) -> QuantSpec:
    weight_bits, act_bits = parse_bits(bits)
    merged = {**default_overrides(weight_bits, pipe.denoiser), **(overrides or {})}
    fields = dict(weight_bits=weight_bits, act_bits=act_bits, backend=backend, per_step=per_step, overrides=merged)
    try:
        QuantSpec(**fields, calibration="-")  # settings first: a bad one fails before calibrating
    except ValidationError as exc:
        raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    path = calibration_for(pipe, num_steps, guidance, act_bits, per_class, seed, calibration)
    return QuantSpec(**fields, calibration=str(path))


def ptq(pipe, num_steps: int = 50, bits: str = "w8a8", backend: str = "fake", per_step: bool = False,
        keep: tuple[str, ...] = (), cache: dict | None = None, guidance: float = 3.0, per_class: int = 2,
        seed: int = 0) -> Plan:
    """A plan whose layers run quantized at ``bits``; ``keep`` lists layer-name patterns to leave in
    floating point. Without ``cache`` every step computes; ``cache`` names a caching method and its
    settings (``{"method": "keysteps", "keys": 12}``) whose schedule the quantized model follows;
    ``"correct": true`` there fits a per-channel correction of the cached features on the quantized
    model, so that it absorbs caching and quantization error together."""
    spec = quant_spec(pipe, num_steps, bits, backend, per_step, dict.fromkeys(keep, FULL_PRECISION), guidance,
                      per_class, seed)
    model = pipe.denoiser
    params = {"bits": bits, "backend": backend, "per_step": per_step, "keep": list(keep)}
    if cache is None:
        rows = ["C" * len(unit_names(model))] * num_steps
        return make_plan(model, rows, "ptq", params).with_quant(spec)
    from diffaccel.methods.registry import build

    settings = dict(cache)
    method = settings.pop("method", None)
    if not isinstance(method, str) or method == "ptq":
        raise ValueError(f"cache must name a caching method, as {{'method': 'keysteps', 'keys': 12}}; got {cache!r}")
    correct = bool(settings.pop("correct", False))  # fitted below, on the quantized model
    caching = build(method, pipe, num_steps, guidance=guidance, **settings)
    params = {**params, "cache": dict(cache), "cache_params": caching.params}
    plan = caching.model_copy(update={"method": f"ptq+{method}", "params": params}).with_quant(spec)
    if correct:
        from diffaccel.methods.feature_correction import fit_feature_correction

        plan = fit_feature_correction(pipe, plan, guidance, seed=seed)
    return plan

"""Timestep-aware post-training quantization (PTQ4DM / Q-Diffusion) as a plan producer.

``ptq(pipe, calls)`` calibrates the denoiser's layer ranges along the calibration workload's
trajectories (``calibration.record.activation_ranges``), saves them as safetensors and returns a
plan with a quantization section: step-free (every step computes) unless ``cache`` names a
caching method whose schedule the quantized model follows. ``plan.with_quant(quant_spec(pipe,
calls, ...))`` adds the same section to any caching plan. A calibration for the same weights,
workload and bits is reused from its file.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from diffaccel.adapters import find_denoiser
from diffaccel.calibration.record import activation_ranges
from diffaccel.calibration.reference import calibration_info, identity_plan
from diffaccel.calibration.workload import Workload, calibration_workload, image_count
from diffaccel.errors import MethodError, QuantError, warn
from diffaccel.fingerprint import fingerprint
from diffaccel.methods.base import Method, Settings
from diffaccel.methods.feature_correction import fit_feature_correction
from diffaccel.plan import Plan
from diffaccel.plan_files import validated
from diffaccel.quant.apply import check_float32, layer_bits
from diffaccel.quant.calibrate import Calibration, quantizable
from diffaccel.quant.spec import FULL_PRECISION, QuantSpec, parse_bits
from diffaccel.runtime.fitted import scheduler_settings

# Layers that carry the timestep or touch pixels directly: one step more precise than the rest
# (QuEST: time-embedding layers are the most sensitive at low bit widths).
SENSITIVE = ("*timestep_embedder*", "*time_embedding*", "pos_embed.proj", "proj_out_2", "proj_out",  # proj_out: PixArt,
             "conv_in", "conv_out")  # SD3 and Flux's output layer


def default_overrides(weight_bits: int, model: torch.nn.Module) -> dict[str, int]:
    """Below 8-bit weights, the sensitive layers of this model stay at 8 bits."""
    if weight_bits >= 8:
        return {}
    names = list(quantizable(model))
    return {p: 8 for p in SENSITIVE if any(fnmatchcase(n, p) for n in names)}


def workload_key(workload: Workload) -> str:
    """The calls and seeds, tensors, arrays and images by their bytes (repr summarizes a large tensor)."""
    return workload.fingerprint()[:12]


def trajectory_key(pipe: Any, model: torch.nn.Module) -> str:
    """What sets the denoiser's inputs besides the calls: the pipeline's other modules (its text
    encoders, say) and its scheduler, class and settings. A cached calibration made under others
    would hold another trajectory's ranges."""
    components = sorted(getattr(pipe, "components", {}).items())
    parts = [f"{name}={fingerprint(part)}" for name, part in components
             if isinstance(part, torch.nn.Module) and part is not model]
    parts += [f"{name}={hashlib.sha256(json.dumps(sorted(part.get_vocab().items())).encode()).hexdigest()[:8]}"
              for name, part in components if callable(getattr(part, "get_vocab", None))]  # tokenizers
    _, scheduler = find_denoiser(pipe)
    if scheduler is not None:
        parts.append(f"{type(scheduler).__name__}={json.dumps(scheduler_settings(scheduler), sort_keys=True)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


def calibration_for(pipe: Any, workload: Workload, act_bits: int, path: str | Path | None = None,
                    progress: bool = False) -> Path:
    """The calibration file for these weights, workload and bits: loaded if it exists and fits, else made."""
    model, _ = find_denoiser(pipe)
    made_on = f"{workload_key(workload)}-{trajectory_key(pipe, model)}"
    given = path is not None
    if path is None:
        folder = Path(tempfile.gettempdir()) / "diffaccel-calibration"
        folder.mkdir(exist_ok=True)
        path = folder / f"{fingerprint(model)}-{made_on}-A{act_bits}.safetensors"
    path = Path(path)
    if path.exists():
        try:
            found = Calibration.load(path)
            found.check(model, act_bits)
        except QuantError:
            found = None  # stale or foreign: calibrate again
        if found is not None and found.workload in ("", made_on):
            return path
        if found is not None and given:  # a plan may read it: never overwritten behind the user's back
            raise QuantError(f"{path} holds ranges calibrated on other calls or another pipeline setup; delete it, "
                             "or name another file, to calibrate on these")
    calibration = activation_ranges(pipe, workload, act_bits, progress=progress)
    calibration.workload = made_on
    calibration.save(path)
    return path


def quant_spec(pipe: Any, calls: Workload | Iterable[dict] | None = None, bits: str = "w8a8", backend: str = "fake",
               per_step: bool = False, overrides: dict[str, int] | None = None, calibration: str | None = None,
               progress: bool = False) -> QuantSpec:
    """A quantization section calibrated on ``calls`` (the embedded default workload if None)."""
    try:
        weight_bits, act_bits = parse_bits(bits)
    except ValueError as exc:
        raise MethodError(str(exc)) from None
    model, _ = find_denoiser(pipe)
    check_float32(model)  # before calibrating
    merged = {**default_overrides(weight_bits, model), **(overrides or {})}
    fields = dict(weight_bits=weight_bits, act_bits=act_bits, backend=backend, per_step=per_step, overrides=merged)
    # settings first: a bad one fails before calibrating
    checked = validated(QuantSpec, {**fields, "calibration": "-"}, "quantization settings", MethodError)
    bits_of = layer_bits(checked, list(quantizable(model)), dict(model.named_modules()))  # every pattern names a layer
    if bits_of and all(b == FULL_PRECISION for b in bits_of.values()):
        warn(f"the overrides keep every layer in floating point: this {checked.label} plan quantizes "
             "nothing")
    path = calibration_for(pipe, calibration_workload(calls, pipe), act_bits, calibration, progress)
    return QuantSpec(**fields, calibration=str(path))


class PtqSettings(Settings):
    bits: str = Field("w8a8", description="weight and activation bits, e.g. w8a8, w4a8")
    backend: Literal["fake", "int8", "int8-dynamic"] = Field("fake", description="fake (simulated), int8, "
                                                                                 "int8-dynamic (fbgemm, CPU)")
    per_step: bool = Field(False, description="one activation scale per step")
    keep: tuple[str, ...] = Field((), description="layer-name patterns kept in floating point")
    cache: dict | None = Field(None, description='a caching method to follow, e.g. {"method": "keysteps", "keys": 12}')


def build(pipe: Any, workload: Workload, s: PtqSettings, caching: Plan | None = None) -> Plan:
    """The quantized plan; ``caching``: the plan ``s.cache`` names, made by the caller (the registry
    builds it from the settings; in Python pass a plan to ``ptq(..., cache=plan)``)."""
    if s.cache is not None and caching is None:
        raise MethodError(f"cache {s.cache!r} needs its plan built first: use diffaccel.methods.build('ptq', ...) "
                          "or pass cache=<a caching plan>")
    spec = quant_spec(pipe, workload, s.bits, s.backend, s.per_step, dict.fromkeys(s.keep, FULL_PRECISION))
    model, _ = find_denoiser(pipe)
    params = {"bits": s.bits, "backend": s.backend, "per_step": s.per_step, "keep": list(s.keep)}
    info = calibration_info(model, workload, image_count(workload), Calibration.load(spec.calibration).num_steps, pipe)
    if caching is None:
        base = identity_plan(model)
        return base.model_copy(update={"method": "ptq", "params": params, "calibration": info}).with_quant(spec)
    if caching.quant is not None:
        raise MethodError("the caching plan is already quantized")
    cache = dict(s.cache or {"method": caching.method})
    params = {**params, "cache": cache, "cache_params": caching.params}
    plan = caching.model_copy(update={"method": f"ptq+{caching.method}", "params": params, "calibration": info})
    plan = plan.with_quant(spec)
    return fit_feature_correction(pipe, plan, workload) if cache.get("correct") else plan


PTQ = Method("ptq", "timestep-aware post-training quantization (PTQ4DM / Q-Diffusion)", PtqSettings, build,
             calibrated=True, composes=True)


def ptq(pipe: Any, calls: Workload | Iterable[dict] | None = None, bits: str = "w8a8", cache: Plan | None = None,
        **settings: Any) -> Plan:
    """A plan whose layers run quantized at ``bits``, calibrated on ``calls`` (the embedded default
    workload if None); ``cache``: a caching plan the quantized model follows (its schedule and
    settings; correct it on the quantized model with ``fit_feature_correction``). Other settings:
    ``PtqSettings``."""
    if cache is not None and not isinstance(cache, Plan):
        raise MethodError(f"ptq(..., cache=...) takes a caching plan, e.g. cache=methods.keysteps(pipe, calls, "
                          f"keys=12), not {type(cache).__name__}: the {{'method': ...}} form is "
                          "diffaccel.methods.build('ptq', ...)'s and the command line's")
    s = PTQ.make_settings(bits=bits, **settings)
    return build(pipe, calibration_workload(calls, pipe), s, cache)

"""Quantization libraries on the denoiser: torchao's ``quantize_`` and optimum-quanto's ``quantize``,
alone and with diffaccel's key-step caching plan (as a user would combine them)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffaccel.bench.peers.base import Candidate, Context, PeerSpec, at_least
from diffaccel.calibration.workload import Workload
from diffaccel.methods.registry import build
from diffaccel.runtime import accelerate

ANY = ("dit", "pixart", "sd3", "flux", "unet")


def _with_our_cache(ctx: Context, pipe, keys: int | None, quantize: Callable[[torch.nn.Module], None],
                    counted: bool = True) -> Candidate:
    """Quantize the pipeline's denoiser with a peer library; with ``keys``, also run diffaccel's
    key-step caching plan (profiled on the full-precision model first, as a user would combine them).
    ``counted=False``: the library's kernels are invisible to torch's FLOP counter, so MACs are
    counted on a full-precision copy running the same plan."""
    plan = None
    if keys is not None:
        calls = None if ctx.embedded else Workload(tuple(ctx.calib_calls), "calibration calls")
        plan = build("keysteps", pipe, ctx.steps, guidance=ctx.guidance, calls=calls, keys=int(keys))

    def runner(the_pipe):
        def run(call):
            if plan is None:
                return ctx.sample(the_pipe, call)
            with accelerate(the_pipe, plan):
                return ctx.sample(the_pipe, call)
        return run

    quantize(ctx.denoiser(pipe))
    notes = "" if plan is None else f"with diffaccel keysteps keys={keys}"
    if not counted:
        notes = "; ".join(filter(None, [notes, "MACs counted on the full-precision model (int8 kernels are "
                                               "invisible to torch's FLOP counter)"]))
    return Candidate(runner(pipe), notes=notes, count=None if counted else runner(ctx.fresh_pipe()))


TORCHAO_CONFIGS = {"int8-weight-only": "Int8WeightOnlyConfig", "int8-dynamic": "Int8DynamicActivationInt8WeightConfig"}


def torchao_int8(ctx: Context, settings: dict) -> Candidate:
    """torchao's ``quantize_(model, config)`` on the denoiser (its default filter: every nn.Linear)."""
    import torchao.quantization as tq  # optional: the peers extra

    s = SPECS["torchao"].settings(settings)
    config = getattr(tq, TORCHAO_CONFIGS[s["config"]])()
    return _with_our_cache(ctx, ctx.fresh_pipe(), s["cache_keys"], lambda model: tq.quantize_(model, config))


def quanto_int8(ctx: Context, settings: dict) -> Candidate:
    """optimum-quanto's ``quantize`` + ``freeze``; with int8 activations, their scales come from its
    ``Calibration`` context over a run of the calibration seeds (as its docs prescribe)."""
    from optimum import quanto  # optional: the peers extra

    s = SPECS["quanto"].settings(settings)
    pipe = ctx.fresh_pipe()
    activations = getattr(quanto, s["activations"]) if s["activations"] else None

    def quantize(model):
        quanto.quantize(model, weights=getattr(quanto, s["weights"]), activations=activations)
        if activations is not None:
            with quanto.Calibration():
                for call in ctx.calib_calls:
                    ctx.sample(pipe, call)
        quanto.freeze(model)

    return _with_our_cache(ctx, pipe, s["cache_keys"], quantize, counted=False)

def _check_torchao(settings: dict) -> None:
    at_least(settings, 1, "cache_keys")
    if settings["config"] not in TORCHAO_CONFIGS:
        raise ValueError(f"config must be one of {', '.join(TORCHAO_CONFIGS)}, got {settings['config']!r}")


SPECS: dict[str, PeerSpec] = {spec.name: spec for spec in [
    PeerSpec("torchao", "torchao int8", ANY, "torchao", "torchao==0.18.0",
             {"config": "int8-weight-only", "cache_keys": None}, torchao_int8, check=_check_torchao),
    PeerSpec("quanto", "optimum-quanto int8", ANY, "optimum.quanto", "optimum-quanto==0.2.7",
             {"weights": "qint8", "activations": None, "cache_keys": None}, quanto_int8,
             check=lambda settings: at_least(settings, 1, "cache_keys")),
]}

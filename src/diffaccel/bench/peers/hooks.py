"""diffusers' own cache hooks (FirstBlockCache, TaylorSeer, Pyramid Attention Broadcast,
FasterCache, MagCache) on a pipeline's transformer.

The DiT and PixArt transformers have no ``CacheMixin``, so (as diffusers' own pipelines do for the
models that have it) every forward runs inside a cache context, set by a forward pre-hook; the
hooks' state, which diffusers does not reset between calls on such models, is reset before each
pipeline call.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from collections.abc import Callable

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks.faster_cache import _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS
from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

from diffaccel.bench.peers.base import Candidate, Context, PeerSpec, at_least

TRANSFORMERS = ("dit", "pixart")


def _timestep_of(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0])
    return None if t is None else float(t)


def _diffusers_hooked(ctx: Context, apply: Callable[[torch.nn.Module, dict], None]) -> Candidate:
    """A fresh pipeline whose transformer carries a diffusers hook, with a cache context around
    every forward and the running timestep at hand for hooks that ask for it."""
    pipe = ctx.fresh_pipe()
    model = ctx.denoiser(pipe)
    current = {"t": 1000.0}
    apply(model, current)
    registry = HookRegistry.check_if_exists_or_initialize(model)

    def enter(module, args, kwargs):
        t = _timestep_of(args, kwargs)
        current["t"] = current["t"] if t is None else t
        _set_cache_context(model, CacheContext("cond"))  # guidance runs as one doubled batch

    handles = [model.register_forward_pre_hook(enter, with_kwargs=True),
               model.register_forward_hook(lambda module, args, out: _set_cache_context(model, None))]

    def run(call):
        registry.reset_stateful_hooks()
        return ctx.sample(pipe, call)

    def close() -> None:  # the transformer as it came: its forwards unhooked
        for handle in handles:
            handle.remove()
        remove_diffusers_hooks(model)

    return Candidate(run, close=close)


def remove_diffusers_hooks(model: torch.nn.Module) -> None:
    """Every diffusers hook on ``model`` and its submodules, removed (each restores the forward it wrapped)."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for name in list(registry.hooks) if registry is not None else []:
            registry.remove_hook(name, recurse=False)


def diffusers_fbc(ctx: Context, settings: dict) -> Candidate:
    s = SPECS["diffusers-fbc"].settings(settings)
    config = FirstBlockCacheConfig(threshold=s["threshold"])
    return _diffusers_hooked(ctx, lambda m, _: apply_first_block_cache(m, config))


def diffusers_taylorseer(ctx: Context, settings: dict) -> Candidate:
    s = SPECS["diffusers-taylorseer"].settings(settings)
    config = TaylorSeerCacheConfig(cache_interval=s["interval"], max_order=s["order"],
                                   disable_cache_before_step=s["warmup"],
                                   taylor_factors_dtype=getattr(torch, s["factors_dtype"]),
                                   cache_identifiers=list(s["identifiers"]))
    return _diffusers_hooked(ctx, lambda m, _: apply_taylorseer_cache(m, config))


def diffusers_pab(ctx: Context, settings: dict) -> Candidate:
    s = SPECS["diffusers-pab"].settings(settings)

    def apply(model, current):
        apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=s["skip_range"],
            spatial_attention_timestep_skip_range=tuple(s["timestep_range"]),
            current_timestep_callback=lambda: current["t"]))

    return _diffusers_hooked(ctx, apply)


def diffusers_fastercache(ctx: Context, settings: dict) -> Candidate:
    s = SPECS["diffusers-fastercache"].settings(settings)
    if ctx.guidance <= 1.0:  # without guidance there is no unconditional half (it had failed with an IndexError)
        raise ValueError("FasterCache skips the unconditional half of classifier-free guidance; it needs guidance > 1")

    def apply(model, current):
        apply_faster_cache(model, FasterCacheConfig(
            spatial_attention_block_skip_range=s["skip_range"],
            spatial_attention_timestep_skip_range=tuple(s["timestep_range"]),
            unconditional_batch_skip_range=s["unconditional_skip"],
            current_timestep_callback=lambda: current["t"], tensor_format="BCHW",
            # a DiT's class labels are batched [unconditional, conditional] like its latents: the
            # default identifiers omit them, so skipping the unconditional half would mismatch batches
            _unconditional_conditional_input_kwargs_identifiers=[*_UNCOND_COND_INPUT_KWARGS_IDENTIFIERS,
                                                                  "class_labels"]))

    return _diffusers_hooked(ctx, apply)


def _magcache_ratios(ctx: Context) -> list[float]:
    """MagCache's calibration run (``calibrate=True``) on the calibration seeds, once per worker:
    the hook prints the per-step magnitude ratios at the end of the run, as its docs describe."""
    if "magcache_ratios" not in ctx.shared:
        candidate = _diffusers_hooked(ctx, lambda m, _: apply_mag_cache(
            m, MagCacheConfig(calibrate=True, num_inference_steps=ctx.steps)))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            for call in ctx.calib_calls:
                candidate.run(call)
        found = re.findall(r"Calibration Complete[^\n]*\n(\[[^\]]*\])", printed.getvalue())
        if not found:
            raise RuntimeError("MagCache's calibration run printed no ratios")
        ctx.shared["magcache_ratios"] = [float(v) for v in ast.literal_eval(found[-1])]
    return ctx.shared["magcache_ratios"]


def diffusers_magcache(ctx: Context, settings: dict) -> Candidate:
    s = SPECS["diffusers-magcache"].settings(settings)
    ratios = _magcache_ratios(ctx)
    config = MagCacheConfig(threshold=s["threshold"], max_skip_steps=s["max_skip_steps"],
                            retention_ratio=s["retention_ratio"], num_inference_steps=ctx.steps, mag_ratios=ratios)
    candidate = _diffusers_hooked(ctx, lambda m, _: apply_mag_cache(m, config))
    images = sum(len(c.seeds) for c in ctx.calib_calls)
    candidate.notes = f"mag_ratios calibrated on {images} calibration images (not timed)"
    return candidate

def _check_timestep_range(settings: dict) -> None:
    window = settings["timestep_range"]
    if not (isinstance(window, list | tuple) and len(window) == 2
            and all(isinstance(t, int | float) and not isinstance(t, bool) for t in window) and window[0] < window[1]):
        raise ValueError(f"timestep_range must be two timesteps [first, last] with first < last, e.g. [100, 800], "
                         f"got {window!r}")


def _check_taylorseer(settings: dict) -> None:
    at_least(settings, 1, "interval")
    at_least(settings, 0, "order", "warmup")
    if not isinstance(getattr(torch, str(settings["factors_dtype"]), None), torch.dtype):
        raise ValueError(f"factors_dtype must name a torch dtype (bfloat16, float32, ...), got "
                         f"{settings['factors_dtype']!r}")


def _check_pab(settings: dict) -> None:
    at_least(settings, 1, "skip_range")
    _check_timestep_range(settings)


def _check_fastercache(settings: dict) -> None:
    at_least(settings, 1, "skip_range", "unconditional_skip")
    _check_timestep_range(settings)


def _check_magcache(settings: dict) -> None:
    at_least(settings, 0, "threshold", "max_skip_steps", "retention_ratio")


SPECS: dict[str, PeerSpec] = {spec.name: spec for spec in [
    PeerSpec("diffusers-fbc", "diffusers FirstBlockCache", TRANSFORMERS, "diffusers", "diffusers",
             {"threshold": 0.05}, diffusers_fbc),
    PeerSpec("diffusers-taylorseer", "diffusers TaylorSeer", TRANSFORMERS, "diffusers", "diffusers",
             {"interval": 5, "order": 1, "warmup": 3, "factors_dtype": "bfloat16",
              # without these identifiers TaylorSeer hooks nothing on a DiT (see PEERS.md)
              "identifiers": [r"^transformer_blocks\.\d+\.attn\d?"]}, diffusers_taylorseer,
             check=_check_taylorseer),
    PeerSpec("diffusers-pab", "diffusers Pyramid Attention Broadcast", TRANSFORMERS, "diffusers", "diffusers",
             {"skip_range": 2, "timestep_range": [100, 800]}, diffusers_pab, check=_check_pab),
    PeerSpec("diffusers-fastercache", "diffusers FasterCache", TRANSFORMERS, "diffusers", "diffusers",
             {"skip_range": 2, "timestep_range": [-1, 681], "unconditional_skip": 5}, diffusers_fastercache,
             check=_check_fastercache),
    PeerSpec("diffusers-magcache", "diffusers MagCache", TRANSFORMERS, "diffusers", "diffusers",
             {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2}, diffusers_magcache,
             check=_check_magcache),
]}

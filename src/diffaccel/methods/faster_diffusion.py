"""Faster Diffusion: encoder propagation. At non-key steps a U-Net skips its encoder (conv_in,
down blocks, mid block) and runs only the decoder on the cached encoder features; consecutive
non-key decoders can run as one batch (parallel decoding, timesteps from the pipeline's
scheduler); prior noise injection adds a little of the initial noise back to late latents."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from diffaccel.adapters.unet import encoder_units
from diffaccel.methods.base import (
    Method,
    Settings,
    check_applies,
    key_steps_uniform,
    make_plan,
    rows_from,
    unit_names,
)
from diffaccel.plan import NoiseInjection, Plan


class FasterDiffusionSettings(Settings):
    interval: int = Field(3, ge=1, description="key steps every interval steps after the warm-up")
    warmup: int = Field(5, ge=1, description="leading key steps")
    parallel: bool = Field(True, description="run consecutive decoder-only steps as one batch")
    noise_strength: float = Field(0.0, ge=0, description="> 0: prior noise injection of this strength")
    noise_from: float = Field(0.7, ge=0, le=1, description="fraction of the run from which noise is injected")


def build(unet: torch.nn.Module, num_steps: int, s: FasterDiffusionSettings) -> Plan:
    check_applies(FASTER_DIFFUSION, unet)
    units = unit_names(unet)
    rows = rows_from(num_steps, units, key_steps_uniform(num_steps, s.interval, s.warmup), encoder_units(units))
    inject = NoiseInjection(strength=s.noise_strength, from_step=int(s.noise_from * num_steps)) \
        if s.noise_strength > 0 else None
    params = {"interval": s.interval, "warmup": s.warmup, "parallel": s.parallel, "noise_strength": s.noise_strength}
    return make_plan(unet, rows, "faster_diffusion", params, parallel_decode=s.parallel, noise_injection=inject)


FASTER_DIFFUSION = Method("faster_diffusion", "encoder propagation, parallel decoding (Faster Diffusion)",
                          FasterDiffusionSettings, build, needs=frozenset({"skip-branches"}))


def faster_diffusion(target: Any, num_steps: int = 50, interval: int = 3, **settings: Any) -> Plan:
    """A Faster Diffusion plan for ``target``'s U-Net over ``num_steps`` denoiser
    evaluations (``steps.model_evaluations``: N + 1 for PNDM's N steps); settings:
    ``FasterDiffusionSettings``."""
    return FASTER_DIFFUSION.make(target, num_steps, interval=interval, **settings)

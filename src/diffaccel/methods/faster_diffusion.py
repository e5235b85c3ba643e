"""Faster Diffusion: encoder propagation. At non-key steps a U-Net skips its encoder (conv_in,
down blocks, mid block) and runs only the decoder on the cached encoder features; consecutive
non-key decoders can run as one batch (parallel decoding); prior noise injection adds a little of
the initial noise back to late latents."""

from __future__ import annotations

from diffaccel.methods.base import key_steps_uniform, make_plan, rows_from, unit_names
from diffaccel.plan import NoiseInjection, Plan


def faster_diffusion(unet, num_steps: int = 50, interval: int = 3, warmup: int = 5,
                     parallel: bool = True, noise_strength: float = 0.0, noise_from: float = 0.7,
                     timesteps: list[float] | None = None) -> Plan:
    """Key steps: the first ``warmup`` steps, then every ``interval``-th. ``noise_strength`` > 0
    turns on noise injection from fraction ``noise_from`` of the run on. Parallel decoding needs
    the timesteps, which the executor takes from the pipeline's scheduler (or give ``timesteps``)."""
    units = unit_names(unet)
    encoder = {u for u in units if u == "conv_in" or u.startswith("down.") or u == "mid"}
    rows = rows_from(num_steps, units, key_steps_uniform(num_steps, interval, warmup), encoder)
    inject = NoiseInjection(strength=noise_strength, from_step=int(noise_from * num_steps)) \
        if noise_strength > 0 else None
    return make_plan(unet, rows, "faster_diffusion",
                     {"interval": interval, "warmup": warmup, "parallel": parallel, "noise_strength": noise_strength},
                     parallel_decode=parallel, noise_injection=inject, timesteps=timesteps)

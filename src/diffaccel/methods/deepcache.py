"""DeepCache: on partial steps, run only the shallow path of a U-Net and reuse the deep features
below skip branch ``branch`` from the last full step."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from diffaccel.adapters.unet import deep_units
from diffaccel.methods.base import (
    Method,
    Settings,
    check_applies,
    key_steps_early_dense,
    key_steps_uniform,
    make_plan,
    rows_from,
    unit_names,
)
from diffaccel.plan import Plan


class DeepCacheSettings(Settings):
    interval: int = Field(3, ge=1, description="one full step, then interval-1 partial ones")
    branch: int = Field(0, ge=0, description="skip branch below which features are reused (0: shallowest)")
    uniform: bool = Field(True, description="uniform full steps, else crowded at the start")
    power: float = Field(1.6, gt=0, description="non-uniform spacing exponent")
    key_steps: int | None = Field(None, description="non-uniform: number of full steps (instead of interval)")


def build(unet: torch.nn.Module, num_steps: int, s: DeepCacheSettings) -> Plan:
    check_applies(DEEPCACHE, unet)
    units = unit_names(unet)
    if s.uniform:
        keys = key_steps_uniform(num_steps, s.interval)
    else:
        keys = key_steps_early_dense(num_steps, s.interval, s.power, count=s.key_steps)
    rows = rows_from(num_steps, units, keys, deep_units(len(unet.down_blocks), s.branch))
    params = {"interval": s.interval, "branch": s.branch, "uniform": s.uniform, "power": s.power}
    if s.key_steps is not None:
        params["key_steps"] = s.key_steps
    return make_plan(unet, rows, "deepcache", params)


DEEPCACHE = Method("deepcache", "U-Net skip-branch reuse (DeepCache)", DeepCacheSettings, build,
                   needs=frozenset({"skip-branches"}))


def deepcache(target: Any, num_steps: int = 50, interval: int = 3, **settings: Any) -> Plan:
    """A DeepCache plan for ``target``'s U-Net over ``num_steps`` denoiser
    evaluations (``steps.model_evaluations``: N + 1 for PNDM's N steps); settings: ``DeepCacheSettings``."""
    return DEEPCACHE.make(target, num_steps, interval=interval, **settings)

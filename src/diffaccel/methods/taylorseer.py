"""TaylorSeer: instead of reusing a unit's last output, extrapolate it from the last computed
outputs with a Taylor expansion (finite differences) of order 1 or 2 in the step index."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from diffaccel.methods.base import Method, Settings
from diffaccel.methods.fora import ForaSettings
from diffaccel.methods.fora import build as build_fora
from diffaccel.plan import Plan


class TaylorSeerSettings(Settings):
    interval: int = Field(3, ge=1, description="full steps every interval steps")
    order: Literal[1, 2] = Field(1, description="Taylor order of the forecast")
    warmup: int = Field(3, ge=1, description="leading full steps (at least order + 1 points are needed)")
    granularity: Literal["block", "component"] = "block"
    components: tuple[str, ...] | None = None


def build(model: torch.nn.Module, num_steps: int, s: TaylorSeerSettings) -> Plan:
    settings = ForaSettings(interval=s.interval, warmup=max(s.warmup, s.order + 1),
                                        granularity=s.granularity, components=s.components, order=s.order)
    return build_fora(model, num_steps, settings)


TAYLORSEER = Method("taylorseer", "Taylor forecasting of cached units (TaylorSeer)", TaylorSeerSettings, build)


def taylorseer(target: Any, num_steps: int = 50, interval: int = 3, **settings: Any) -> Plan:
    """A TaylorSeer plan for ``target``'s denoiser over ``num_steps`` denoiser
    evaluations (``steps.model_evaluations``: N + 1 for PNDM's N steps); settings: ``TaylorSeerSettings``."""
    return TAYLORSEER.make(target, num_steps, interval=interval, **settings)

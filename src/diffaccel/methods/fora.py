"""FORA: static block caching. Recompute every ``interval`` steps and reuse in between, per block
(the residual of each transformer block) or per component (attention / feed-forward outputs)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from diffaccel.errors import MethodError
from diffaccel.methods.base import (
    Method,
    Settings,
    check_applies,
    key_steps_uniform,
    make_plan,
    rows_from,
    unit_names,
)
from diffaccel.plan import Plan


class ForaSettings(Settings):
    interval: int = Field(3, ge=1, description="one full step, then interval-1 reused ones")
    warmup: int = Field(1, ge=1, description="leading steps that always compute")
    granularity: Literal["block", "component"] = Field("block", description="cache whole blocks or components")
    components: tuple[str, ...] | None = Field(None, description="with granularity component: which (e.g. ff)")
    units: tuple[str, ...] | None = Field(None, description="unit names to reuse (default: the adapter's)")
    order: int = Field(0, ge=0, le=2, description="0 reuses; 1 or 2 forecasts (TaylorSeer)")


def build(model: torch.nn.Module, num_steps: int, s: ForaSettings) -> Plan:
    names = unit_names(model, s.granularity)
    adapter = check_applies(FORA, model)
    if s.components and s.granularity != "component":
        raise MethodError("components choose parts of blocks: give them with granularity 'component'")
    cached = set(s.units) if s.units is not None else adapter.default_reused(model, s.granularity, s.components)
    if s.components and not cached:
        parts = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise MethodError(f"no unit is a component named {', '.join(s.components)}; this model's are "
                          f"{', '.join(parts)}")
    action = "F" if s.order > 0 else "R"
    rows = rows_from(num_steps, names, key_steps_uniform(num_steps, s.interval, s.warmup), cached, action)
    params = {"interval": s.interval, "warmup": s.warmup, "granularity": s.granularity,
              "components": list(s.components or []), "order": s.order}
    return make_plan(model, rows, "fora" if s.order == 0 else "taylorseer", params, granularity=s.granularity,
                     forecast_order=max(s.order, 1))


FORA = Method("fora", "static block / component caching (FORA)", ForaSettings, build)


def fora(target: Any, num_steps: int = 50, interval: int = 3, **settings: Any) -> Plan:
    """A FORA plan for ``target``'s denoiser (a pipeline or the model) over ``num_steps`` denoiser
    evaluations; settings: ``ForaSettings``."""
    return FORA.make(target, num_steps, interval=interval, **settings)

"""Static block caching (FORA): recompute every ``interval`` steps, reuse in between; per block
(the residual of each transformer block) or per component (attention / feed-forward outputs)."""

from __future__ import annotations

from diffaccel.adapters import adapter_for
from diffaccel.adapters.unet import deep_units
from diffaccel.methods.base import key_steps_uniform, make_plan, rows_from, unit_names
from diffaccel.plan import Plan


def default_cached_units(model, granularity: str, components: tuple[str, ...] | None) -> set[str]:
    units = unit_names(model, granularity)
    if adapter_for(model).name == "unet":  # everything but the shallowest path
        return deep_units(len(model.down_blocks), 0)
    if granularity == "component" and components:
        return {u for u in units if u.rsplit(".", 1)[-1] in components}
    return set(units)


def fora(model, num_steps: int = 50, interval: int = 3, warmup: int = 1, granularity: str = "block",
         components: tuple[str, ...] | None = None, units: list[str] | None = None, order: int = 0) -> Plan:
    """``order`` 0 reuses cached values; 1 or 2 forecasts them (TaylorSeer, see ``taylorseer``)."""
    names = unit_names(model, granularity)
    cached = set(units) if units is not None else default_cached_units(model, granularity, components)
    action = "F" if order > 0 else "R"
    rows = rows_from(num_steps, names, key_steps_uniform(num_steps, interval, warmup), cached, action)
    return make_plan(model, rows, "fora" if order == 0 else "taylorseer",
                     {"interval": interval, "warmup": warmup, "granularity": granularity,
                      "components": list(components or []), "order": order},
                     granularity=granularity, forecast_order=max(order, 1))

"""First-block / dual-block residual caching (DBCache, FirstBlockCache): a runtime rule. The first
``first_blocks`` units always run; when their residual changed by less than ``threshold``
(relative L1) since the last computed step, the middle units are reused (or forecast), and the
last ``last_blocks`` units run again to refine."""

from __future__ import annotations

from diffaccel.adapters import adapter_for
from diffaccel.methods.base import unit_names
from diffaccel.plan import Plan, ResidualRule


def first_block_cache(model, threshold: float = 0.1, first_blocks: int = 1, last_blocks: int = 0,
                      warmup: int = 2, max_consecutive: int = 3, forecast_order: int = 0) -> Plan:
    adapter = adapter_for(model)
    if adapter.name == "unet":
        raise ValueError("the residual rule needs a transformer (a chain of residual blocks), not a U-Net")
    rule = ResidualRule(first_blocks=first_blocks, last_blocks=last_blocks, threshold=threshold,
                        warmup=warmup, max_consecutive=max_consecutive, forecast_order=forecast_order)
    return Plan(adapter=adapter.name, model_class=type(model).__name__, units=unit_names(model), rule=rule,
                method="dbcache" if last_blocks else "first_block_cache", params=rule.model_dump())

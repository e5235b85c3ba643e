"""First-block / dual-block residual caching (FBCache, DBCache): a runtime rule. The first
``first_blocks`` units always run; when their residual changed by less than ``threshold``
(relative L1) since the last computed step, the middle units are reused (or forecast), and the
last ``last_blocks`` units run again to refine. ``dbcache`` is the same rule with one last block."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from diffaccel.methods.base import Method, Settings, check_applies, checked_plan, unit_names
from diffaccel.plan import Plan, ResidualRule


class FirstBlockCacheSettings(Settings):
    threshold: float = Field(0.1, gt=0, description="reuse while the first blocks' residual changes less")
    first_blocks: int = Field(1, ge=1, description="units that always compute first")
    last_blocks: int = Field(0, ge=0, description="units that always compute last")
    warmup: int = Field(2, ge=1, description="leading steps that always compute")
    max_consecutive: int = Field(3, ge=1, description="cap on consecutive reused steps")
    forecast_order: int = Field(0, ge=0, le=2, description="0 reuses; 1-2 forecasts the skipped units")


def build(model: torch.nn.Module, num_steps: int | None, s: FirstBlockCacheSettings) -> Plan:
    """A step-free plan (``num_steps`` is ignored: the rule decides at run time)."""
    check_applies(DBCACHE if s.last_blocks else FIRST_BLOCK_CACHE, model)
    rule = ResidualRule(**s.model_dump())
    return checked_plan(model, "dbcache" if s.last_blocks else "first_block_cache", rule.model_dump(),
                        units=unit_names(model), rule=rule)


FIRST_BLOCK_CACHE = Method("first_block_cache", "dynamic first-block residual rule (FBCache)",
                           FirstBlockCacheSettings, build, needs=frozenset({"residual-chain"}), step_free=True)
DBCACHE = Method("dbcache", "dual-block residual rule (DBCache): first and last blocks always run",
                 FirstBlockCacheSettings, build, needs=frozenset({"residual-chain"}), defaults={"last_blocks": 1},
                 step_free=True)


def first_block_cache(target: Any, threshold: float = 0.1, **settings: Any) -> Plan:
    """A first-block-cache rule for ``target``'s denoiser; settings: ``FirstBlockCacheSettings``."""
    return FIRST_BLOCK_CACHE.make(target, None, threshold=threshold, **settings)


def dbcache(target: Any, threshold: float = 0.1, **settings: Any) -> Plan:
    """The dual-block rule (``last_blocks`` 1 by default) for ``target``'s denoiser."""
    return DBCACHE.make(target, None, threshold=threshold, **settings)

"""Shared helpers for methods: every method ends in ``make_plan`` with its schedule rows."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from diffaccel.adapters import adapter_for
from diffaccel.plan import Plan

CALIBRATION_SEED = 7_000_001  # calibration noise seeds never meet the evaluation seeds (0, 1, ...)


def calibration_batch(pipe, classes: list[int] | None, per_class: int, seed: int):
    """Labels and generators for ``per_class`` calibration images of each class (embedded pipelines)."""
    from diffaccel.generate import image_seed

    num_classes = pipe.denoiser.config.get("num_embeds_ada_norm") or 6
    ids = classes if classes is not None else list(range(num_classes))
    labels = torch.tensor([c for c in ids for _ in range(per_class)])
    gens = [torch.Generator().manual_seed(image_seed(CALIBRATION_SEED + seed, c, j))
            for c in ids for j in range(per_class)]
    return labels, gens


def unit_names(model: torch.nn.Module, granularity: str = "block") -> list[str]:
    return [u.name for u in adapter_for(model).units(model, granularity)]


def make_plan(model: torch.nn.Module, rows: list[str], method: str, params: dict, granularity: str = "block",
              **fields) -> Plan:
    adapter = adapter_for(model)
    return Plan(adapter=adapter.name, model_class=type(model).__name__,
                units=unit_names(model, granularity), granularity=granularity, num_steps=len(rows),
                schedule=rows, method=method, params=params, **fields)


def key_steps_uniform(num_steps: int, interval: int, warmup: int = 1) -> set[int]:
    """Steps that compute everything: the first ``warmup`` steps, then every ``interval``-th."""
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    warmup = max(1, warmup)
    return set(range(min(warmup, num_steps))) | set(range(warmup - 1, num_steps, interval))


def key_steps_early_dense(num_steps: int, interval: int, power: float = 1.6, count: int | None = None) -> set[int]:
    """About ``num_steps / interval`` key steps (or ``count``), spaced as ``(k/K)**power`` so that
    they crowd the start of sampling, where features move fastest (DeepCache's non-uniform schedule)."""
    if count is not None and not 2 <= count <= num_steps:
        raise ValueError(f"key_steps must lie in [2, {num_steps}], got {count}")
    count = count if count is not None else max(2, -(-num_steps // interval))
    keys = {round((k / (count - 1)) ** power * (num_steps - 1)) for k in range(count)}
    return keys | {0}


def rows_from(num_steps: int, units: list[str], keys: Iterable[int], skipped: set[str], action: str = "R",
              ) -> list[str]:
    """Schedule rows: all-compute at key steps, ``action`` for the ``skipped`` units elsewhere."""
    keys = set(keys)
    unknown = skipped - set(units)
    if unknown:
        raise ValueError(f"unknown units {sorted(unknown)}; the model has {units}")
    return ["C" * len(units) if s in keys else "".join(action if u in skipped else "C" for u in units)
            for s in range(num_steps)]

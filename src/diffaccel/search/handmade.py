"""The hand-made plans a search starts from and is compared with: each registry method that makes
a static schedule, at several settings."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from diffaccel.adapters import adapter_for
from diffaccel.methods import deepcache, faster_diffusion, fora, taylorseer
from diffaccel.plan import Plan
from diffaccel.quant.spec import QuantSpec


@dataclass(frozen=True)
class HandMade:
    name: str
    settings: dict
    plan: Plan

    @property
    def key(self) -> str:
        return self.name + " " + " ".join(f"{k}={v}" for k, v in self.settings.items())


def handmade_plans(model: torch.nn.Module, num_steps: int, quant: QuantSpec | None = None,
                   quant_alone: bool = False) -> list[HandMade]:
    """Hand-made static plans for ``model`` at ``num_steps`` steps (duplicate schedules dropped), each
    quantized with ``quant`` if given, and with ``quant_alone`` the quantization alone first (it saves
    bit-ops or time, not MACs, and may be the best plan there)."""
    found: list[HandMade] = []
    if quant is not None and quant_alone:
        found.append(HandMade("quantization alone", {}, fora(model, num_steps, 1)))
    intervals = [i for i in (2, 3, 4, 5, 6) if i < num_steps]

    def add(name: str, settings: dict, make) -> None:
        try:
            found.append(HandMade(name, settings, make()))
        except ValueError:  # a setting that does not fit this model or step count (MethodError)
            pass

    if "skip-branches" in adapter_for(model).capabilities:  # a U-Net
        for interval in intervals[:4]:
            for branch in (0, 1):
                add("deepcache", {"interval": interval, "branch": branch},
                    lambda i=interval, b=branch: deepcache(model, num_steps, i, branch=b))
        for interval in (3, 5):
            if interval < num_steps:
                add("deepcache", {"interval": interval, "branch": 0, "uniform": False},
                    lambda i=interval: deepcache(model, num_steps, i, branch=0, uniform=False))
        warmup = min(5, max(1, num_steps // 10))
        for interval in intervals[:3]:
            add("faster_diffusion", {"interval": interval, "warmup": warmup},
                lambda i=interval: faster_diffusion(model, num_steps, i, warmup=warmup, parallel=True))
        for interval in intervals[:2]:
            add("fora", {"interval": interval}, lambda i=interval: fora(model, num_steps, i))
    else:
        names = [u.name for u in adapter_for(model).units(model)]
        for interval in intervals:
            add("fora", {"interval": interval}, lambda i=interval: fora(model, num_steps, i))
        if len(names) >= 3:
            for interval in intervals[:3]:
                add("fora", {"interval": interval, "units": "middle"},
                    lambda i=interval: fora(model, num_steps, i, units=names[1:-1]))
        warmup = 3 if num_steps > 8 else 2
        for order, chosen in ((1, (3, 4, 5)), (2, (4, 5, 6))):
            for interval in chosen:
                if interval < num_steps:
                    add("taylorseer", {"interval": interval, "order": order},
                        lambda i=interval, o=order: taylorseer(model, num_steps, i, order=o, warmup=warmup))
    unique: dict[tuple, HandMade] = {}
    for item in found:
        p = item.plan
        identity = (tuple(p.schedule), p.parallel_decode, p.noise_injection is not None, p.forecast_order)
        unique.setdefault(identity, item)
    if quant is None:
        return list(unique.values())
    return [replace(item, plan=item.plan.with_quant(quant)) for item in unique.values()]

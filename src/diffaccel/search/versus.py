"""The searched plan against hand-made plans on the same held-out images, at equal quality.

A single "best hand-made plan at the budget" compares two points at different PSNR. The fair
comparison puts the searched plan on the hand-made Pareto front of the same images: the hand-made
cost at the searched plan's PSNR (interpolated linearly between the two front points around it),
and the hand-made PSNR at the searched plan's cost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffaccel.calibration.reference import checked_images, run_with_plan
from diffaccel.eval.fidelity import fidelity
from diffaccel.plan import Plan

LOG = logging.getLogger("diffaccel")

@dataclass
class Point:
    """One plan measured on the held-out set: PSNR against the unaccelerated images, MAC speedup."""

    name: str
    settings: dict
    psnr: float
    speedup_macs: float
    speedup_wall: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "settings": self.settings, "psnr": self.psnr, "speedup_macs": self.speedup_macs,
                "speedup_wall": self.speedup_wall, **self.extra}


def measure(pipe: Any, heldout: Callable, plans: Iterable[tuple[str, dict, Plan]], reference: Any = None,
            log: Callable[[str], None] = LOG.info) -> list[Point]:
    """PSNR and MAC speedup of each plan on the held-out set (one untimed run each)."""
    reference = checked_images(heldout(pipe), "held-out") if reference is None else reference
    points = []
    for name, settings, plan in plans:
        result, executor = run_with_plan(pipe, heldout, plan)
        quality = fidelity(checked_images(result, "held-out"), reference)
        speedup = executor.stats.full_macs / max(1, executor.stats.macs)
        points.append(Point(name, settings, quality["psnr"], speedup))
        log(f"  {name} {settings}: {quality['psnr']:.2f} dB, {speedup:.2f}x MACs")
    return points


def front(points: list[Point], speed: str = "speedup_macs") -> list[Point]:
    """Non-dominated points (PSNR up, speedup up), fastest first."""
    ordered = sorted(points, key=lambda p: (-getattr(p, speed), -p.psnr))
    out: list[Point] = []
    for p in ordered:
        if not out or p.psnr > out[-1].psnr:
            out.append(p)
    return out


def bracket(points: list[Point], psnr: float) -> tuple[Point, Point, float] | None:
    """The two front points whose PSNRs enclose ``psnr`` and the interpolation weight of the second
    (PSNR is monotone along the front); None if ``psnr`` lies outside the front's range."""
    line = front(points)
    for fast, slow in zip(line, line[1:]):  # fast.psnr < slow.psnr
        if fast.psnr <= psnr <= slow.psnr:
            return fast, slow, (psnr - fast.psnr) / (slow.psnr - fast.psnr)
    return None


def cost_at(points: list[Point], psnr: float, speed: str = "speedup_macs") -> float | None:
    """Hand-made cost (1 / speedup) at ``psnr``, linear in PSNR between the bracketing front points."""
    found = bracket(points, psnr)
    if found is None:
        return None
    fast, slow, w = found
    a, b = getattr(fast, speed), getattr(slow, speed)
    if a is None or b is None:
        return None
    return float((1 - w) / a + w / b)


def psnr_at(points: list[Point], speedup: float) -> float | None:
    """Hand-made PSNR at a MAC speedup, linear in cost between the front points around it."""
    line = front(points)
    costs = np.array([1 / p.speedup_macs for p in line])
    if not line or not costs[0] <= 1 / speedup <= costs[-1]:
        return None
    return float(np.interp(1 / speedup, costs, [p.psnr for p in line]))


def cost_bracket(points: list[Point], speedup: float) -> tuple[Point, Point] | None:
    """The two front points whose MAC speedups enclose ``speedup`` (faster first)."""
    line = front(points)
    for fast, slow in zip(line, line[1:]):
        if slow.speedup_macs <= speedup <= fast.speedup_macs:
            return fast, slow
    return None


def psnr_at_wall(pair: tuple[Point, Point], speedup_wall: float) -> float | None:
    """PSNR at a wall-clock speedup, linear in cost between two points whose wall-clock was measured."""
    fast, slow = pair
    if fast.speedup_wall is None or slow.speedup_wall is None:
        return None
    a, b = 1 / fast.speedup_wall, 1 / slow.speedup_wall
    if not min(a, b) <= 1 / speedup_wall <= max(a, b) or a == b:
        return None
    w = (1 / speedup_wall - a) / (b - a)
    return float((1 - w) * fast.psnr + w * slow.psnr)

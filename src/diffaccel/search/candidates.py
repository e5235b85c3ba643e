"""Evaluated candidates: their scores, the Pareto front and the choice under a budget."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from diffaccel.calibration.reference import CalibrationRun
from diffaccel.errors import SearchError
from diffaccel.search.config import Budget
from diffaccel.search.handmade import HandMade
from diffaccel.search.space import Genome, Space
from diffaccel.search.store import Store


@dataclass
class Candidate:
    genome: Genome | None
    schedule: list[str]
    psnr: float
    psnr_min: float
    ssim: float
    mac_fraction: float
    latency_fraction: float
    source: str
    trial: int | None = None
    extra: dict = field(default_factory=dict)
    bops_fraction: float | None = None  # joint searches: bit-weighted MACs (``Space.bit_mac_fraction``)
    psnr_p5: float | None = None  # the 5th-percentile image of the calibration set
    plan: object = None  # the candidate's plan, when it is no genome of the space (the joint search)

    def meets(self, budget: Budget) -> bool:
        return budget.accepts(self.quality(budget), self.psnr_p5)

    def quality(self, budget: Budget) -> float:
        return self.psnr if budget.metric == "psnr" else self.ssim

    def cost(self, objective: str) -> float:
        if objective == "bops":
            return self.bops_fraction if self.bops_fraction is not None else self.mac_fraction
        return self.mac_fraction if objective == "macs" else self.latency_fraction

    def as_dict(self) -> dict:
        return {"source": self.source, "trial": self.trial, "calib_psnr": self.psnr, "calib_psnr_p5": self.psnr_p5,
                "calib_psnr_min": self.psnr_min,
                "calib_ssim": self.ssim, "mac_fraction": self.mac_fraction,
                "latency_fraction": self.latency_fraction, "bops_fraction": self.bops_fraction, **self.extra,
                "schedule": self.schedule}



def pareto(points: list[Candidate], budget: Budget, objective: str) -> list[Candidate]:
    """Non-dominated candidates (quality up, cost down), cheapest first; duplicates dropped."""
    ordered = sorted(points, key=lambda c: (c.cost(objective), -c.quality(budget), c.trial or 0))
    front: list[Candidate] = []
    best = -math.inf
    for c in ordered:
        if c.quality(budget) > best:
            front.append(c)
            best = c.quality(budget)
    return front


def ordered(points: list[Candidate], budget: Budget, objective: str) -> list[Candidate]:
    """The candidates meeting the budget, cheapest first (the better of equal cost first)."""
    return sorted((c for c in points if c.meets(budget)), key=lambda c: (c.cost(objective), -c.quality(budget),
                                                                           c.trial or 0))


def choose(points: list[Candidate], budget: Budget, objective: str) -> tuple[Candidate, bool, float]:
    """The cheapest candidate meeting the budget; else the closest one, tail bound included (the best
    mean had been taken, 14.6 dB under a psnr_p5 bound, and reported short by a negative number), and
    its shortfall."""
    meeting = ordered(points, budget, objective)
    if meeting:
        return meeting[0], True, 0.0
    best = min(points, key=lambda c: (budget.shortfall(c.quality(budget), c.psnr_p5), -c.quality(budget),
                                      c.cost(objective), -(c.trial or 0)))
    return best, False, budget.shortfall(best.quality(budget), best.psnr_p5)



def candidates_of(store: Store, space: Space) -> list[Candidate]:
    out = []
    for trial in store.complete():
        genome = space.from_params(trial.params)
        if genome is None:
            continue
        a = trial.user_attrs
        extra = {"error": a["error"]} if "error" in a else {}
        out.append(Candidate(genome, space.rows(genome), a.get("psnr", 0.0), a.get("psnr_min", 0.0),
                             a.get("ssim", 0.0), a.get("mac_fraction", 1.0), a.get("latency_fraction", 1.0),
                             a.get("source", ""), trial.number, extra, a.get("bops_fraction"), a.get("psnr_p5")))
    return out


def handmade_scores(store: Store, calib: CalibrationRun, handmade: list[HandMade], space: Space,
                    deadline: float | None = None, log: Callable[[str], None] | None = None,
                    enough: Budget | None = None, objective: str = "macs") -> list[Candidate]:
    """Calibration scores of the hand-made plans, cheapest first, cached in the study (they survive
    a restart); those not scored by ``deadline`` are left out, and so are those that cost at least
    as much as one that meets ``enough`` (the budget with the largest margin the search may add:
    such a plan could neither be returned nor be the best hand-made plan). Each new score is
    logged (``log``)."""
    cached = dict(store.study.user_attrs.get("handmade", {}))
    out: list[Candidate] = []
    index = 1 if objective == "latency" else 0  # bit operations rank as MACs: every hand-made plan has the same bits
    bar, passed = math.inf, 0
    costs = {item.key: calib.fractions(item.plan)[index] for item in handmade}
    for item in sorted(handmade, key=lambda h: costs[h.key]):
        if costs[item.key] >= bar:
            passed += 1
            continue
        if item.key not in cached and deadline is not None and time.time() >= deadline:
            continue
        if item.key not in cached:
            try:
                s = calib.score(item.plan)
            except SearchError:
                raise
            except Exception:  # noqa: BLE001 -- a hand-made setting that breaks is left out
                continue
            cached[item.key] = {"psnr": s.psnr, "psnr_p5": s.psnr_p5, "psnr_min": s.psnr_min, "ssim": s.ssim,
                                "mac_fraction": s.mac_fraction, "latency_fraction": s.latency_fraction,
                                "psnr_std": s.psnr_std}
            store.study.set_user_attr("handmade", cached)
            if log is not None:
                log(f"  hand-made {item.key}: {s.psnr:.2f} dB (p5 {s.psnr_p5:.2f}), {1 / s.mac_fraction:.2f}x MACs")
        candidate = _handmade_candidate(item, cached[item.key], space, calib)
        if candidate.cost(objective) < 1.0 - 1e-9:  # saves work as the objective counts it (bit-ops: quantization)
            out.append(candidate)
            if enough is not None and out[-1].meets(enough):
                bar = min(bar, (out[-1].mac_fraction, out[-1].latency_fraction)[index])
    if passed and log is not None:
        log(f"  {passed} dearer hand-made plans not scored: a cheaper one meets {enough.text} already")
    return out


def _handmade_candidate(item: HandMade, s: dict, space: Space, calib: CalibrationRun) -> Candidate:
    genome = space.genome(item.plan.schedule)  # forecasts read as reuse: the same cost
    bops = None if space.quant is None or genome is None else space.bit_mac_fraction(genome, calib.unit_macs)
    return Candidate(None, list(item.plan.schedule), s["psnr"], s["psnr_min"], s["ssim"], s["mac_fraction"],
                     s["latency_fraction"], item.key, None,
                     {"name": item.name, "settings": item.settings, "psnr_std": s.get("psnr_std")},
                     bops, s.get("psnr_p5"), item.plan)



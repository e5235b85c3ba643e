"""Validation: before a plan is returned, the plans that cleared the budget on the calibration
images are re-scored, cheapest first, on fresh noise seeds of the same calls until one meets the
budget there too, by the error bound of its mean over those images.

Why: a search picks the cheapest of many plans scored on a few images, and fits some of them
(timesteps, solver coefficients) to those images, so the winner's calibration score is flattered by
the choice. On the embedded U-Net a fitted 5-step sampler scored 32.0 dB on 24 calibration images
and 29.7 dB on 48 held-out ones; the margin (``config.auto_margin``) alone did not catch it. The
validation images are scored by an unbiased mean (nothing was chosen or fitted on them), and they
are not the held-out check's, which stays an independent measurement of the returned plan. For a
PSNR budget the validation mean must clear it by its one-sided 95% error bound (1.645 times the
per-image spread over the square root of the image count): a plan whose mean only just clears it
there is as likely under the budget as over it on other seeds (the U-Net plan above scored 30.4 dB on
24 validation seeds and 29.7 on the held-out ones). A tail bound (``psnr_p5>=X``) is checked the same
way, by a 95% lower confidence bound on the 5th percentile (``config.tail_lower_bound``: an order
statistic, the worst image up to 92 images, the 2nd worst from 93) rather than the validation images'
own 5th percentile: the SD search's 6-step plan had 26.7 dB there against a bound of 25, and 23.9 on
600 others. For a tail bound the validation runs copies of the calibration calls (other seeds each)
up to ``config.TAIL_IMAGES``: on 48 images the bound was their worst, at 90%, and let two 6-step plans
through that had 5.7% and 7.5% of 600 other images under 25 dB.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from diffaccel.calibration.reference import CalibrationRun, checked_images, run_with_plan
from diffaccel.calibration.workload import Workload
from diffaccel.eval.fidelity import fidelity, psnr_per_image
from diffaccel.plan import Plan
from diffaccel.search.candidates import Candidate
from diffaccel.search.config import TAIL_CONFIDENCE, TAIL_IMAGES, Budget, mean_error_bound, tail_lower_bound
from diffaccel.search.judged import JudgedCheck

VALIDATION_SEED_OFFSET = 2000  # validation seeds: apart from calibration (0) and correction-fit (1000) seeds
MAX_VALIDATED = 6  # plans tried before the search gives up confirming one
MAX_COPIES = 4  # copies of the calibration calls a tail bound's validation runs at most (a small calibration set)
FINAL_SHARE = 0.3  # of the calibration run's time, kept for the validation after a search that took back the rest:
# a check or two of few-step plans (on the SD pipeline's tail-bounded 40-minute search the checks made during it took
# the whole reserve, and the final validation checked one plan, not the 7-step fit next in line)


@dataclass
class Validation:
    """The plan chosen after validation, and what the validation measured on the way."""

    chosen: Candidate
    scores: dict  # the chosen plan's on the validation images (``fidelity``)
    confirmed: bool  # the chosen plan met the budget on the validation images
    tried: list[dict]  # per plan tried, cheapest first: source, PSNR, 5th percentile, SSIM, met
    images: int
    seconds: float

    def summary(self) -> dict:
        return {"validation_images": self.images, "validation_confirmed": self.confirmed,
                "validation_psnr": self.scores["psnr"], "validation_psnr_p5": self.scores["psnr_p5"],
                "validation_psnr_p5_bound": self.scores.get("psnr_p5_bound"), "judged": self.scores.get("judged"),
                "validation_tried": self.tried, "validation_seconds": round(self.seconds, 1)}


def validation_seconds(calib: CalibrationRun, copies: int = 1) -> float:
    """Estimated time of a validation on ``copies`` copies of the calibration calls: the unaccelerated
    run of the fresh seeds and a few cheap plans."""
    return 1.6 * calib.seconds * copies


def tail_copies(images: int) -> int:
    """Copies of calibration calls that make ``images`` images a tail bound's validation runs: enough
    for ``TAIL_IMAGES`` images, at most ``MAX_COPIES``."""
    return min(MAX_COPIES, max(1, math.ceil(TAIL_IMAGES / max(1, images))))


def tail_text(images: int) -> str:
    """How the validation's ``images`` bound the 5th percentile, saying so when too few hold it at
    ``TAIL_CONFIDENCE`` (their worst image then, at the confidence it has)."""
    _, held = tail_lower_bound([0.0] * images)
    if held >= TAIL_CONFIDENCE:
        return f" and a {TAIL_CONFIDENCE:.0%} lower confidence bound on their 5th percentile"
    needed = next(n for n in itertools.count(images) if tail_lower_bound([0.0] * n)[1] >= TAIL_CONFIDENCE)
    return (f" and a lower confidence bound on their 5th percentile: their worst image, at only {held:.1%} "
            f"confidence ({TAIL_CONFIDENCE:.0%} needs {needed} images; more calibration images give them)")


def validation_copies(calib: CalibrationRun, budget: Budget) -> int:
    """Copies of the calibration calls the validation runs: one, or under a tail bound ``tail_copies``."""
    return 1 if budget.tail is None else tail_copies(len(calib.reference))


class Validator:
    """Scores plans on the calibration calls with fresh noise seeds, each plan once (the
    unaccelerated run of those seeds is made at the first check). The joint search asks it whether
    the plan that bars dearer ones holds there (``JointSearch._cannot_win``); the final validation
    reuses what it measured."""

    def __init__(self, calib: CalibrationRun, budget: Budget, plan_of: Callable[[Candidate], Plan],
                 log: Callable[[str], None], judged: JudgedCheck | None = None):
        """``judged``: a plan met on the validation seeds must also keep the judge's verdicts (``judged.py``)."""
        self.calib, self.budget, self.plan_of, self.log, self.judged = calib, budget, plan_of, log, judged
        self.copies = validation_copies(calib, budget)
        self.workload = calib.calibrate.repeated(self.copies, VALIDATION_SEED_OFFSET,
                                                 "validation seeds (calibration calls, fresh noise)")
        self._reference: Any = None
        self._records: dict[str, dict | None] = {}  # by plan: what ``check`` measured (None: it failed)
        self.seconds = 0.0

    @property
    def reference(self) -> Any:
        if self._reference is None:
            started = time.time()
            self._reference = checked_images(self.workload(self.calib.pipe), "validation")
            self.seconds += time.time() - started
            tail = "" if self.budget.tail is None else tail_text(len(self._reference))
            self.log(f"validation: plans that cleared the budget are scored on {len(self._reference)} fresh "
                     f"calibration seeds, and count only if they meet {self.budget.text} there by their mean's "
                     f"error bound{tail} (the unaccelerated run took {time.time() - started:.1f} s)")
        return self._reference

    def check(self, candidate: Candidate) -> dict | None:
        """``candidate`` scored on the validation seeds (source, fidelity, error bound, met); None when
        its plan fails there (logged)."""
        plan = self.plan_of(candidate)
        key = plan.model_dump_json()
        if key not in self._records:
            reference = self.reference
            started = time.time()
            self._records[key] = self._measure(candidate, plan, reference)
            self.seconds += time.time() - started
        return self._records[key]

    def reserve(self) -> float:
        """The time a search keeps back for its validation, and for a judge budget's checks."""
        return validation_seconds(self.calib, self.copies) + (self.judged.seconds() if self.judged is not None else 0.0)

    def reserve_used(self) -> float:
        """Seconds spent so far of ``reserve()``: what a search that validates as it goes may take back
        (a judge budget's checks run inside the validation: their time counts too), less
        ``FINAL_SHARE`` of the calibration run's time per copy of the calls, kept for the validation
        after the search."""
        return min(self.seconds, max(0.0, self.reserve() - FINAL_SHARE * self.calib.seconds * self.copies))

    def measured(self, candidate: Candidate) -> bool:
        """Whether ``candidate`` was scored already (by the search as it went: a free look-up)."""
        return self.plan_of(candidate).model_dump_json() in self._records

    def confirmed(self, candidate: Candidate) -> bool:
        record = self.check(candidate)
        return record is not None and record["met"]

    def _measure(self, candidate: Candidate, plan: Plan, reference: Any) -> dict | None:
        try:
            images = checked_images(run_with_plan(self.calib.pipe, self.workload, plan, self.calib.shape_macs)[0],
                                    "validation")
        except Exception as exc:  # noqa: BLE001 -- a plan that breaks on other seeds is not confirmed
            self.log(f"  {candidate.source}: failed on validation ({type(exc).__name__}: {str(exc)[:160]})")
            return None
        quality, bound = fidelity(images, reference), error_bound(images, reference, self.budget)
        value = quality["psnr"] if self.budget.metric == "psnr" else quality["ssim"]
        tail, held = tail_lower_bound(psnr_per_image(images, reference).tolist())
        met = self.budget.accepts(value - bound, tail)
        shown = f"{bound:.2f}{self.budget.unit()}" if math.isfinite(bound) else "none from one image"
        tail_text = f", p5 at least {tail:.1f} with {held:.0%} confidence" if self.budget.tail is not None else ""
        self.log(f"  {candidate.source}: {quality['psnr']:.2f} dB (p5 {quality['psnr_p5']:.1f}, error bound "
                 f"{shown}{tail_text}) on validation, {candidate.psnr:.2f} dB on calibration: "
                 f"{'confirmed' if met else 'not confirmed'}")
        judged = self.judged.check(plan, candidate.source) if met and self.judged is not None else None
        return {"source": candidate.source, **quality, "bound": bound if math.isfinite(bound) else None,
                "psnr_p5_bound": tail, "psnr_p5_confidence": round(held, 3), "judged": judged,
                "met": met and (judged is None or judged["met"])}


def validator_for(calib: CalibrationRun, budget: Budget, plan_of: Callable[[Candidate], Plan],
                  log: Callable[[str], None], judged: JudgedCheck | None = None) -> Validator | None:
    """A ``Validator``, or None (logged) when the calibration set is a callable rather than a
    ``Workload``: it has no noise seeds to change."""
    if isinstance(calib.calibrate, Workload):
        return Validator(calib, budget, plan_of, log, judged)
    log("validation skipped: the calibration set is a callable, not a Workload of pipeline calls "
        "(no noise seeds to change); the plan is chosen on the calibration images alone")
    return None


def validate(validator: Validator, ordered: list[Candidate], deadline: float | None,
             seeds: Collection[Candidate] = ()) -> Validation | None:
    """Check ``ordered`` (the candidates that cleared the budget on calibration, cheapest first) on
    the validation seeds until one meets the budget there; None when nothing is to be validated.
    At most ``MAX_VALIDATED`` are measured here, until ``deadline``; those the search measured as it
    went count at no cost, wherever they stand (a dearer plan it confirmed is not forgotten), and the
    hand-made ``seeds`` are measured past the cap, until ``deadline`` (on the U-Net under a tail bound
    the 6 checks went to cheaper fits and the search returned a plan slower than its unchecked best
    seed). When none is confirmed, the one that scored best there."""
    if not ordered:
        return None
    budget, log = validator.budget, validator.log
    tried: list[tuple[Candidate, dict]] = []
    fresh, late = 0, False
    for candidate in ordered:
        known = validator.measured(candidate)
        if not known:
            late = late or (bool(tried) and deadline is not None and time.time() > deadline)
            if late or (fresh >= MAX_VALIDATED and candidate not in seeds):
                continue  # a dearer plan the search measured, or a seed, may still follow
            fresh += 1
        record = validator.check(candidate)
        if record is not None:
            tried.append((candidate, record))
            if record["met"]:
                break
    if late:
        log("validation: out of time")
    images = len(validator.reference)
    if not tried:
        log("warning: every plan tried failed on the validation seeds; the cheapest is returned unconfirmed")
        return Validation(ordered[0], {"psnr": None, "psnr_p5": None}, False, [], images, validator.seconds)
    confirmed = tried[-1][1]["met"]
    chosen, scores = tried[-1] if confirmed else \
        max(tried, key=lambda pair: pair[1]["psnr" if budget.metric == "psnr" else "ssim"])
    if not confirmed:
        log(f"warning: no plan tried met {budget.text} on the validation seeds; the one that scored best there "
            f"({chosen.source}) is returned; search again with more calibration images or a larger margin")
    return Validation(chosen, scores, confirmed, [record for _, record in tried], images, validator.seconds)


def error_bound(images: Any, reference: Any, budget: Budget) -> float:
    """What the validation mean must clear the budget by: for PSNR, the one-sided 95% error bound of
    the mean (capped as the search margin is); an SSIM budget is taken as it is."""
    if budget.metric != "psnr":
        return 0.0
    if len(images) < 2:  # one image has no spread to bound its mean by: nothing is confirmed on it
        return math.inf
    return mean_error_bound(float(psnr_per_image(images, reference).std()), len(images))


def plan_getter(space: Any) -> Callable[[Candidate], Plan]:
    """The plan of a candidate: its own (hand-made and joint-search candidates) or its genome's."""
    return lambda candidate: candidate.plan if candidate.plan is not None else space.plan(candidate.genome)

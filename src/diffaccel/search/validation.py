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
24 validation seeds and 29.7 on the held-out ones).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffaccel.calibration.reference import CalibrationRun, checked_images, run_with_plan
from diffaccel.calibration.workload import Workload
from diffaccel.eval.fidelity import fidelity, psnr_per_image
from diffaccel.plan import Plan
from diffaccel.search.candidates import Candidate
from diffaccel.search.config import Budget, mean_error_bound

VALIDATION_SEED_OFFSET = 2000  # validation seeds: apart from calibration (0) and correction-fit (1000) seeds
MAX_VALIDATED = 6  # plans tried before the search gives up confirming one


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
                "validation_tried": self.tried, "validation_seconds": round(self.seconds, 1)}


def validation_seconds(calib: CalibrationRun) -> float:
    """Estimated time of a validation: the unaccelerated run of the fresh seeds and a few cheap plans."""
    return 1.6 * calib.seconds


def validate(calib: CalibrationRun, ordered: list[Candidate], budget: Budget, plan_of: Callable[[Candidate], Plan],
             deadline: float | None, log: Callable[[str], None]) -> Validation | None:
    """Score ``ordered`` (the candidates that cleared the budget on calibration, cheapest first) on
    the calibration calls with fresh seeds, until one meets ``budget`` there; None when the
    calibration set is not a ``Workload`` (no seeds to change) or nothing is to be validated.
    When none is confirmed (``MAX_VALIDATED`` tried, or ``deadline``), the one that scored best there."""
    if not ordered:
        return None
    if not isinstance(calib.calibrate, Workload):
        log("validation skipped: the calibration set is a callable, not a Workload of pipeline calls "
            "(no noise seeds to change); the plan is chosen on the calibration images alone")
        return None
    started = time.time()
    workload = calib.calibrate.reseeded(VALIDATION_SEED_OFFSET, "validation seeds (calibration calls, fresh noise)")
    reference = checked_images(workload(calib.pipe), "validation")
    log(f"validation: the cheapest plans that cleared the budget, on {len(reference)} fresh calibration seeds, "
        f"until one meets {budget.text} there by its mean's error bound (the unaccelerated run took "
        f"{time.time() - started:.1f} s)")
    tried: list[tuple[Candidate, dict]] = []
    for candidate in ordered[:MAX_VALIDATED]:
        if tried and deadline is not None and time.time() > deadline:
            log("validation: out of time")
            break
        try:
            images = checked_images(run_with_plan(calib.pipe, workload, plan_of(candidate), calib.shape_macs)[0],
                                    "validation")
        except Exception as exc:  # noqa: BLE001 -- a plan that breaks on other seeds is not confirmed
            log(f"  {candidate.source}: failed on validation ({type(exc).__name__}: {str(exc)[:160]})")
            continue
        quality, bound = fidelity(images, reference), error_bound(images, reference, budget)
        value = quality["psnr"] if budget.metric == "psnr" else quality["ssim"]
        met = budget.accepts(value - bound, quality["psnr_p5"])
        tried.append((candidate, {"source": candidate.source, **quality, "bound": bound, "met": met}))
        log(f"  {candidate.source}: {quality['psnr']:.2f} dB (p5 {quality['psnr_p5']:.1f}, error bound "
            f"{bound:.2f}{budget.unit()}) on validation, {candidate.psnr:.2f} dB on calibration: "
            f"{'confirmed' if met else 'not confirmed'}")
        if met:
            break
    if not tried:
        log("warning: every plan tried failed on the validation seeds; the cheapest is returned unconfirmed")
        return Validation(ordered[0], {"psnr": None, "psnr_p5": None}, False, [], len(reference),
                          time.time() - started)
    confirmed = tried[-1][1]["met"]
    chosen, scores = tried[-1] if confirmed else \
        max(tried, key=lambda pair: pair[1]["psnr" if budget.metric == "psnr" else "ssim"])
    if not confirmed:
        log(f"warning: no plan tried met {budget.text} on the validation seeds; the one that scored best there "
            f"({chosen.source}) is returned; search again with more calibration images or a larger margin")
    return Validation(chosen, scores, confirmed, [record for _, record in tried], len(reference), time.time() - started)


def error_bound(images: Any, reference: Any, budget: Budget) -> float:
    """What the validation mean must clear the budget by: for PSNR, the one-sided 95% error bound of
    the mean (capped as the search margin is); an SSIM budget is taken as it is."""
    if budget.metric != "psnr" or len(images) < 2:
        return 0.0
    return mean_error_bound(float(psnr_per_image(images, reference).std()), len(images))


def plan_getter(space: Any) -> Callable[[Candidate], Plan]:
    """The plan of a candidate: its own (hand-made and joint-search candidates) or its genome's."""
    return lambda candidate: candidate.plan if candidate.plan is not None else space.plan(candidate.genome)

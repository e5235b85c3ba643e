"""A judge's verdicts in the budget (``judge>=-1``): what the prompt asked for, not only pixels.

A PSNR budget cannot see whether an image still shows what was asked: on the shipped PixArt
pipeline 8-step plans at 31-33 dB lost 4.3-4.8 points of prompt adherence on 600 images (the shapes
go), where a 9-step one at the same PSNR kept it. A judge is any callable ``judge(images, workload)``
returning, per image (N, C, H, W in [0, 1], drawn by ``workload``'s calls in order), 1 when it shows
what its call asked for and 0 when not (or a score in between: a CLIP similarity scaled to [0, 1]);
the shipped text-to-image and class-conditional models bring their evaluator's
(``Target.judge``). Under ``judge>=X`` a plan is returned only when the mean of its images' verdicts
falls by at most X points from the unaccelerated images' of the same seeds, by a one-sided 95% lower
confidence bound on that change (``JudgedCheck.check``).

Why not on the calibration images: on 48 of them a few points are one or two images, and any two
runs differ by that much (a 49-step DDIM run reads 1 of 48 PixArt shapes differently from the 50-step
one). So the verdicts are compared on about ``judge_images`` images (the calibration calls with other
noise: 600 by default, where a 4-point loss lies outside the interval of the change), and only for
the plans the validation confirms, cheapest first: the check is part of the validation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from diffaccel.calibration.reference import CalibrationRun, checked_images, run_with_plan
from diffaccel.calibration.workload import Workload
from diffaccel.errors import SearchError
from diffaccel.eval.paired import paired_change
from diffaccel.plan import Plan
from diffaccel.search.config import Z_ONE_SIDED_95, Budget

Judge = Callable[[torch.Tensor, Workload], "torch.Tensor | Sequence[float]"]
JUDGE_SEED_OFFSET = 3000  # judge seeds: apart from calibration (0), correction (1000) and validation (2000) seeds
MAX_STAGES = 4  # looks at a plan's judged change before the last, where it may be stopped
STAGE_IMAGES = 100  # images a stage holds at least: fewer give no spread to stop on
FUTILITY = 0.05  # a plan whose chance to pass falls under this is stopped (``chance_to_pass``)
MIN_FLIPS = 5  # changed verdicts before a plan may be stopped: on fewer the spread is too rough to project (2 lost
# of 144 reads as a 0.2% chance, for a plan that ends at -0.3 points, bound -0.7, if no other image flips)


def verdicts(judge: Judge, images: torch.Tensor, workload: Workload) -> torch.Tensor:
    """The judge's per-image verdicts on ``images``, checked: one per image, each in [0, 1]."""
    try:
        out = torch.as_tensor(judge(images, workload)).reshape(-1).double()
    except Exception as exc:  # noqa: BLE001 -- a user's judge may raise anything: say it was the judge
        raise SearchError(f"the judge failed on {len(images)} images ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if len(out) != len(images):
        raise SearchError(f"the judge returned {len(out)} verdicts for {len(images)} images: return one per image")
    if not torch.isfinite(out).all() or out.min() < 0 or out.max() > 1:
        raise SearchError("the judge's verdicts must lie in [0, 1] (True/False per image, or a score scaled to it)")
    return out


class JudgedCheck:
    """The judge's verdicts on a plan's images against the unaccelerated ones, on the judge seeds, in
    stages of whole copies of the calibration calls (each stage's unaccelerated run is made when a
    plan first reaches it). After each stage but the last a plan is stopped, and refused, when it
    could reach the bound only if the images still to judge changed far less than those judged
    (``chance_to_pass`` under ``FUTILITY``, once ``MIN_FLIPS`` verdicts changed): a PixArt plan 4
    points down after a quarter of its 624 images costs a quarter of the check. Stopping can only
    refuse a plan, never keep one: the chance of keeping a plan that loses more than the bound stays
    that of the full check."""

    def __init__(self, calib: CalibrationRun, judge: Judge, least: float, images: int, log: Callable[[str], None]):
        self.calib, self.judge, self.least, self.log = calib, judge, least, log
        repeats = max(1, math.ceil(images / len(calib.reference)))
        self.workload = calib.calibrate.repeated(repeats, JUDGE_SEED_OFFSET,
                                                 f"judge seeds: the calibration calls x {repeats}, other noise")
        self.total = repeats * len(calib.reference)  # images judged when a plan runs every stage
        count = _stage_count(repeats, len(calib.reference))
        copies = [round(k * repeats / count) for k in range(count + 1)]
        per_copy = len(calib.calibrate)
        self.stages = [self.workload.take(range(a * per_copy, b * per_copy)) for a, b in zip(copies, copies[1:])]
        self._references: list[torch.Tensor | None] = [None] * len(self.stages)

    @property
    def reference(self) -> torch.Tensor:
        """The unaccelerated images' verdicts, every stage's."""
        return torch.cat([self.reference_of(k) for k in range(len(self.stages))])

    def reference_of(self, stage: int) -> torch.Tensor:
        """The unaccelerated images' verdicts on stage ``stage`` (run at the first call)."""
        if self._references[stage] is None:
            started = time.time()
            images = checked_images(self.stages[stage](self.calib.pipe), "judge")
            self._references[stage] = verdicts(self.judge, images, self.stages[stage])
            if stage == 0:
                self.log(f"judge: up to {self.total} images on other seeds, in {len(self.stages)} stage"
                         f"{'' if len(self.stages) == 1 else 's'} (the first unaccelerated stage took "
                         f"{time.time() - started:.0f} s, {self._references[0].mean() * 100:.1f}% judged right); a "
                         f"plan confirmed on validation must keep that within {-self.least:g} point"
                         f"{'' if abs(self.least) == 1 else 's'}")
        return self._references[stage]

    def seconds(self) -> float:
        """Estimated time of the checks: the unaccelerated run of the judge seeds and a few plans."""
        return 1.8 * self.calib.seconds * len(self.workload) / max(1, len(self.calib.calibrate))

    def check(self, plan: Plan, source: str) -> dict[str, Any]:
        """``plan``'s judged change from the unaccelerated images (``paired_change``, in shares), its
        one-sided 95% lower confidence bound (``bound``), and whether it meets the budget: the bound
        is at least ``least`` points (as the validation's PSNR mean must clear the budget by its error
        bound). The change itself flatters the plan the search keeps: the first to clear it is the
        one whose images happened to flip least (a 40-minute PixArt search kept a plan at -0.6 points
        on these images that lost 2.8 on 600 others). ``stopped``: refused before its last stage."""
        hits, base, stopped = [], [], False
        for k, stage in enumerate(self.stages):
            base.append(self.reference_of(k))
            images = checked_images(run_with_plan(self.calib.pipe, stage, plan, self.calib.shape_macs)[0], "judge")
            hits.append(verdicts(self.judge, images, stage))
            change = paired_change(torch.cat(hits), torch.cat(base))
            judged = sum(len(h) for h in hits)
            if k + 1 < len(self.stages) and change["flips"] >= MIN_FLIPS and \
                    chance_to_pass(change, judged, self.total, self.least) < FUTILITY:
                stopped = True
                break
        bound = None if change["se"] is None else change["change"] - Z_ONE_SIDED_95 * change["se"]
        met = not stopped and bound is not None and bound * 100 >= self.least - 1e-9
        shown = "none from one image" if bound is None else f"{bound * 100:+.1f}"
        of = f" of {self.total}: stopped, it cannot reach the bound" if stopped else ""
        self.log(f"  {source}: judged {change['change'] * 100:+.1f} points on {judged} images{of} (at least "
                 f"{shown} with 95% confidence), {change['flips']} changed: {'kept' if met else 'refused'}")
        return {**change, "bound": bound, "images": judged, "stopped": stopped, "met": met}


def _stage_count(copies: int, per_copy: int) -> int:
    """Stages of whole copies, each of at least ``STAGE_IMAGES`` images, at most ``MAX_STAGES``."""
    return max(1, min(MAX_STAGES, copies, copies * per_copy // STAGE_IMAGES))


def chance_to_pass(change: dict, judged: int, total: int, least: float) -> float:
    """The chance that the bound on all ``total`` images reaches ``least`` points if the images still
    to judge change as the ``judged`` ones did, mean and spread (the conditional power under the
    current trend). Without a spread yet (no image flipped, or all alike) it is 1 or 0 by the change."""
    se = change["se"]
    if se is None or se == 0 or judged >= total:
        return 1.0 if change["change"] * 100 >= least - 1e-9 else 0.0
    spread, rest = se * math.sqrt(judged), total - judged
    needed = least / 100 + Z_ONE_SIDED_95 * spread / math.sqrt(total)  # the final change that passes
    rest_needed = (total * needed - judged * change["change"]) / rest
    return 0.5 * math.erfc((rest_needed - change["change"]) / (spread / math.sqrt(rest)) / math.sqrt(2))


def judged_for(calib: CalibrationRun, budget: Budget, judge: Judge | None, images: int,
               log: Callable[[str], None]) -> JudgedCheck | None:
    """A ``JudgedCheck`` under a judge budget (None without one)."""
    check_judge(budget, judge, calib.calibrate)
    return None if budget.judge is None else JudgedCheck(calib, judge, budget.judge, images, log)


def check_judge(budget: Budget, judge: Judge | None, calibrate: Any) -> None:
    """A clear error when the budget asks for a judge that is missing, or the calibration set has no
    calls to draw more images of."""
    if budget.judge is None:
        return
    if judge is None:
        raise SearchError(f"the budget {budget.text} bounds the judged share of images but no judge was given: pass "
                          "judge=... (a callable (images, workload) -> one verdict in [0, 1] per image), or, on "
                          "the command line, a model that ships an evaluator (--model pixart, sd, unet or dit)")
    if not isinstance(calibrate, Workload):
        raise SearchError("a judge budget needs the calibration set as a Workload of pipeline calls: the judge "
                          "reads what each call asked for, and the check draws more images of those calls")

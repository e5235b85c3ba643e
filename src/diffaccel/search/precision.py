"""The last step of a search: the chosen plan in a lower float precision, when this machine rewards it.

Autocast to bfloat16 or float16 (``Plan.precision``) leaves the MACs as they are and changes the
wall time by what the hardware makes of it: on CPUs with AVX-512 BF16 or AMX, and on GPUs, the
denoiser's matrix products run up to twice as fast; elsewhere bfloat16 is emulated and slower (ten
to twenty times, seen on a CPU without AVX-512 BF16). So the gain is measured, not assumed, in two
looks: first one denoiser forward on the calibration inputs in each precision
(``CalibrationRun.autocast_speed``, a few forwards' time); only if that is at least ``MIN_GAIN``
times as fast does the chosen plan run on the calibration calls in float32 and in the lower
precision, interleaved (``CalibrationRun.timed_against``: the median of two runs each). A lower
precision is kept only when the plan is at least ``MIN_GAIN`` times as fast and still meets the
budget it cleared (and, when the search validates, is confirmed on the validation seeds).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch

from diffaccel.calibration.reference import CalibrationRun
from diffaccel.plan import Plan
from diffaccel.runtime.features.precision import DTYPES
from diffaccel.search.candidates import Candidate
from diffaccel.search.config import Budget
from diffaccel.search.validation import Validator

MIN_GAIN = 1.05  # below this the measured gain is within a machine's run-to-run spread
RUNS = 2  # timed runs of each precision, interleaved


def precisions_for(device: torch.device) -> list[str]:
    """The autocast dtypes worth measuring on ``device``: bfloat16 on a CPU (float16 matrix products
    are emulated there), both on a GPU (bfloat16 where it has it)."""
    if device.type == "cuda":
        return (["bfloat16"] if torch.cuda.is_bf16_supported() else []) + ["float16"]
    return ["bfloat16"] if device.type == "cpu" else []


def precision_choices(setting: str, device: torch.device) -> list[str]:
    """The precisions a search with ``SearchConfig.precision`` = ``setting`` measures on ``device``."""
    if setting == "auto":
        return precisions_for(device)
    return [] if setting == "none" else [setting]


def precision_seconds(calib: CalibrationRun) -> float:
    """The time a search keeps for this step: the runs of a plan about 5x cheaper than the full one."""
    return calib.seconds


def lower_precision(calib: CalibrationRun, chosen: Candidate, plan: Plan, budget: Budget, deadline: float | None,
                    log: Callable[[str], None], validator: Validator | None = None,
                    choices: list[str] | None = None) -> tuple[Candidate, float] | None:
    """``chosen`` (whose plan is ``plan``) in the fastest lower precision that keeps it within
    ``budget``, and that precision's measured speed-up; None when none pays or time is short."""
    if plan.quant is not None or plan.precision is not None:
        return None
    choices = precisions_for(next(calib.model.parameters()).device) if choices is None else choices
    if choices:
        log(f"precision: the chosen plan under autocast ({', '.join(choices)}), timed against float32")
    best: tuple[Candidate, float] | None = None
    forward = calib.seconds / max(1, calib.num_steps)  # about one float32 forward of the denoiser
    for precision in choices:
        if deadline is not None and time.time() + 4 * forward >= deadline:
            log(f"  no time left to measure the plan in {precision}")
            break
        gain = calib.autocast_speed(DTYPES[precision])
        if gain < MIN_GAIN:
            log(f"  one denoiser forward in {precision} runs {gain:.2f}x as fast as in float32 on this machine: "
                "the plan is not timed in it")
            continue
        per_try = RUNS * (1 + 1 / gain) * chosen.latency_fraction * calib.seconds
        if deadline is not None and time.time() + per_try >= deadline:
            log(f"  no time left to measure the plan in {precision}")
            break
        lowered = plan.model_copy(update={"precision": precision})
        speed, s = calib.timed_against(lowered, plan, RUNS)
        candidate = replace(chosen, psnr=s.psnr, psnr_p5=s.psnr_p5, psnr_min=s.psnr_min, ssim=s.ssim,
                            latency_fraction=chosen.latency_fraction / speed, genome=None,
                            source=f"{chosen.source} in {precision}", plan=lowered)
        keep = speed >= MIN_GAIN and candidate.meets(budget)
        log(f"  {candidate.source}: {s.psnr:.2f} dB (p5 {s.psnr_p5:.2f}) against {chosen.psnr:.2f} dB, "
            f"{speed:.2f}x the float32 plan's speed: {'kept' if keep else 'not kept'}")
        if keep and validator is not None:
            keep = validator.confirmed(candidate)
        if keep and (best is None or speed > best[1]):
            best = (candidate, speed)
    return best

"""The last step of a search: the chosen plan in cheaper arithmetic, when this machine rewards it.

Two kinds: autocast to bfloat16 or float16 (``Plan.precision``), and, when the search was given a
quantization spec with a real integer backend, the plan quantized (``Plan.quant``). Both leave the
MACs as they are and change the wall time by what the hardware makes of them: on CPUs with AVX-512
BF16 or AMX, and on GPUs, the denoiser's matrix products run up to twice as fast in bfloat16;
elsewhere bfloat16 is emulated and slower (ten to twenty times, seen on a CPU without AVX-512 BF16).
fbgemm's dynamic int8 linear kernel gains on a transformer's linear layers (1.2x on the embedded DiT
on an AVX2 CPU) and nothing on convolutions, and ``torch._int_mm`` is twenty times slower than
float32 on that CPU. So the gain is measured, not assumed, in two looks: first one denoiser forward
on the calibration inputs each way (``CalibrationRun.forward_speed``, a few forwards' time); only if
that is at least ``MIN_GAIN`` times as fast does the chosen plan run on the calibration calls as it
is and lowered, interleaved (``CalibrationRun.timed_against``: the median of two runs each). A
lowered plan is kept only when it is at least ``MIN_GAIN`` times as fast and still meets the budget
the plan cleared (and, when the search validates, is confirmed on the validation seeds); the fastest
kept one is returned.

Why last: the search ranks its plans by MACs (or by estimated latency), which the arithmetic does
not change in the same proportion for every plan, so the plan it returns is the one measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace

import torch

from diffaccel.calibration.reference import CalibrationRun
from diffaccel.errors import DiffaccelError
from diffaccel.plan import Plan
from diffaccel.quant import Calibration, QuantHandle, QuantSpec, prepare
from diffaccel.runtime.features.precision import DTYPES
from diffaccel.search.candidates import Candidate
from diffaccel.search.config import Budget
from diffaccel.search.validation import Validator

MIN_GAIN = 1.05  # below this the measured gain is within a machine's run-to-run spread
RUNS = 2  # timed runs of each precision, interleaved


@dataclass(frozen=True)
class Arithmetic:
    """One cheaper way to run a plan: its name in the log, the plan so lowered, and what one
    denoiser forward is run inside for the first look."""

    label: str
    lowered: Callable[[Plan], Plan]
    forward: Callable[[], AbstractContextManager]


def autocast(precision: str, device: torch.device) -> Arithmetic:
    return Arithmetic(precision, lambda plan: plan.model_copy(update={"precision": precision}),
                      lambda: torch.autocast(device.type, dtype=DTYPES[precision]))


def quantization(spec: QuantSpec, model: torch.nn.Module) -> Arithmetic:
    """``spec`` applied to a plan; its look quantizes the model's layers once, at the first look."""
    built: list[QuantHandle] = []

    @contextmanager
    def quantized() -> Iterator[None]:
        if not built:
            built.append(prepare(model, spec, Calibration.load(spec.calibration)))
        built[0].apply()
        try:
            yield
        finally:
            built[0].restore()

    return Arithmetic(f"{spec.label} {spec.backend}", lambda plan: plan.with_quant(spec), quantized)


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


def arithmetic_choices(setting: str, quant: QuantSpec | None, model: torch.nn.Module) -> list[Arithmetic]:
    """What the last step measures: the precisions ``setting`` allows, then ``quant`` when it runs
    real integers (simulated quantization is never faster)."""
    device = next(model.parameters()).device
    choices = [autocast(p, device) for p in precision_choices(setting, device)]
    return choices + ([quantization(quant, model)] if quant is not None and quant.backend != "fake" else [])


def precision_seconds(calib: CalibrationRun) -> float:
    """The time a search keeps for this step: the runs of a plan about 5x cheaper than the full one."""
    return calib.seconds


def lower_precision(calib: CalibrationRun, chosen: Candidate, plan: Plan, budget: Budget, deadline: float | None,
                    log: Callable[[str], None], validator: Validator | None = None,
                    choices: list[Arithmetic] | None = None,
                    tried: list[dict] | None = None) -> tuple[Candidate, float] | None:
    """``chosen`` (whose plan is ``plan``) in the fastest cheaper arithmetic that keeps it within
    ``budget``, and its measured speed-up; None when none pays or time is short. Each arithmetic
    measured is appended to ``tried`` (for the results file, kept or not)."""
    tried = [] if tried is None else tried
    if plan.quant is not None or plan.precision is not None:
        return None
    device = next(calib.model.parameters()).device
    choices = [autocast(p, device) for p in precisions_for(device)] if choices is None else choices
    if choices:
        log(f"precision: the chosen plan in {', '.join(a.label for a in choices)}, timed against float32")
    best: tuple[Candidate, float] | None = None
    forward = calib.seconds / max(1, calib.num_steps)  # about one float32 forward of the denoiser
    for arithmetic in choices:
        if deadline is not None and time.time() + 4 * forward >= deadline:
            log(f"  no time left to measure the plan in {arithmetic.label}")
            break
        try:
            gain = calib.forward_speed(arithmetic.forward)
        except DiffaccelError as exc:  # say, fbgemm's int8 kernel asked of a model on a GPU
            log(f"  the plan cannot run in {arithmetic.label} here: {exc}")
            continue
        tried.append({"arithmetic": arithmetic.label, "forward_speed": round(gain, 3)})
        if gain < MIN_GAIN:
            log(f"  one denoiser forward in {arithmetic.label} runs {gain:.2f}x as fast as in float32 on this "
                "machine: the plan is not timed in it")
            continue
        per_try = RUNS * (1 + 1 / gain) * chosen.latency_fraction * calib.seconds
        if deadline is not None and time.time() + per_try >= deadline:
            log(f"  no time left to measure the plan in {arithmetic.label}")
            break
        lowered = arithmetic.lowered(plan)
        speed, s = calib.timed_against(lowered, plan, RUNS)
        candidate = replace(chosen, psnr=s.psnr, psnr_p5=s.psnr_p5, psnr_min=s.psnr_min, ssim=s.ssim,
                            latency_fraction=chosen.latency_fraction / speed, genome=None,
                            source=f"{chosen.source} in {arithmetic.label}", plan=lowered)
        keep = speed >= MIN_GAIN and candidate.meets(budget)
        log(f"  {candidate.source}: {s.psnr:.2f} dB (p5 {s.psnr_p5:.2f}) against {chosen.psnr:.2f} dB, "
            f"{speed:.2f}x the float32 plan's speed: {'kept' if keep else 'not kept'}")
        if keep and validator is not None:
            keep = validator.confirmed(candidate)
        tried[-1].update(speed=round(speed, 3), psnr=s.psnr, psnr_p5=s.psnr_p5, kept=keep)
        if keep and (best is None or speed > best[1]):
            best = (candidate, speed)
    return best

"""``lm_accelerate``: apply an ``LMPlan`` to a ``DLMPipeline`` for the duration of a ``with`` block.

The plan is checked against the pipeline before anything changes (wrong target, wrong model kind,
block size or window that cannot fit the answer), then attached to the pipeline instance; the
pipeline's calls decode as the plan says and add their cost to ``run.stats``. On exit, also after
an exception, the attachment is removed: the model itself is never modified, and no cache outlives
the call that built it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from diffaccel.lm.pipeline import DLMOutput, DLMPipeline
from diffaccel.lm.plan import LMPlan, LMPlanError


@dataclass
class LMStats:
    """Work done by the calls made under a plan, summed."""

    calls: int = 0
    sequences: int = 0
    forwards: int = 0
    macs: int = 0
    full_macs: int = 0  # the uncached LLaDA sampler's cost for the same calls

    @property
    def mac_ratio(self) -> float:
        return self.full_macs / self.macs if self.macs else float("nan")

    def add(self, out: DLMOutput) -> None:
        self.calls += 1
        self.sequences += len(out.texts)
        self.forwards += out.forwards
        self.macs += out.macs
        self.full_macs += out.full_macs

    def as_dict(self) -> dict:
        return {"calls": self.calls, "sequences": self.sequences, "forwards": self.forwards,
                "macs": self.macs, "full_macs": self.full_macs}


@dataclass
class LMRun:
    plan: LMPlan
    stats: LMStats = field(default_factory=LMStats)


def check_fits(target: Any, plan: Any) -> None:
    """Raise ``LMPlanError`` unless ``plan`` can be applied to ``target``."""
    if not isinstance(plan, LMPlan):
        raise LMPlanError(f"lm_accelerate applies an LMPlan, not a {type(plan).__name__}; image plans go "
                          "through diffaccel.accelerate on a diffusers pipeline")
    if not isinstance(target, DLMPipeline):
        raise LMPlanError(f"an LMPlan applies to a diffusion LM pipeline (diffaccel.lm.DLMPipeline), not a "
                          f"{type(target).__name__}; load one with diffaccel.lm.load_dlm()")
    if plan.kind != target.kind:
        raise LMPlanError(f"this plan is for a {plan.kind!r} model; the pipeline holds a {target.kind!r} model")
    answer = target.answer_length
    if plan.answer_length is not None and plan.answer_length != answer:
        raise LMPlanError(f"this plan was made for answers of {plan.answer_length} tokens; the pipeline "
                          f"decodes {answer}")
    if plan.block_size is not None and answer % plan.block_size:
        divisors = [d for d in range(1, answer + 1) if answer % d == 0]
        raise LMPlanError(f"block_size {plan.block_size} does not divide the answer length {answer}; "
                          f"choose one of {divisors}")
    if plan.window is not None and plan.window > answer:
        raise LMPlanError(f"window {plan.window} is larger than the answer ({answer} tokens)")
    if target._lm_run is not None:
        raise LMPlanError("an LM plan is already applied to this pipeline; leave its `with` block first")


@contextlib.contextmanager
def lm_accelerate(target: DLMPipeline, plan: LMPlan) -> Iterator[LMRun]:
    """Decode with ``plan`` inside the ``with`` block; the pipeline is restored on exit, also after
    an exception. Yields the run, whose ``stats`` count the work done."""
    check_fits(target, plan)
    run = LMRun(plan)
    target._lm_run = run
    try:
        yield run
    finally:
        vars(target).pop("_lm_run", None)

"""Fitting a predicted unconditional guidance branch (adaptive guidance, LinearAG) onto a plan.

Classifier-free guidance doubles every step's batch. Late in a trajectory the unconditional output
is close to a linear function of what the step already computes (its conditional output and input)
and of the step before's outputs: one calibration run of the plan records them, and per predicted
step a least-squares fit over every element of every calibration image gives the scalar weights
(``plan.GuidancePrediction``); the executor then runs the conditional half only at those steps
(``runtime/features/guidance.py``). On the embedded DiT's 7-step fitted sampler, predicting the last
step cost 0.09 dB (the sampler's coefficients refitted) for half a step of MACs; earlier steps, and
every step of the embedded U-Net, cost 0.5-1.8 dB each: the search keeps only what pays.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

from diffaccel.adapters import adapter_for, find_denoiser
from diffaccel.calibration.reference import run_with_plan
from diffaccel.calibration.workload import Workload, calibration_workload
from diffaccel.errors import MethodError, PlanError
from diffaccel.plan import GuidancePrediction, Plan, PredictedStep
from diffaccel.plan_files import validated
from diffaccel.runtime.features.base import model_sample
from diffaccel.runtime.features.guidance import StepRecord, guidance_halves, ordered_halves, terms

RIDGE = 1e-6  # damping relative to the terms' mean energy: near-equal terms stay in check
DIGITS = 6

# diffusers pipelines that put the conditional half first (the text-to-image ones put the negative prompt first)
CONDITIONAL_FIRST = ("DiTPipeline",)


def unconditional_half(pipe: Any) -> Literal["first", "second"]:
    """Which half of the guidance batch ``pipe`` gives the unconditional branch."""
    return "second" if type(pipe).__name__ in CONDITIONAL_FIRST else "first"


class _Sums:
    """The normal equations of each predicted step, summed over the calibration run's forwards."""

    def __init__(self, steps: set[int], unconditional_first: bool):
        self.steps, self.unconditional_first = steps, unconditional_first
        self.gram: dict[int, torch.Tensor] = {}
        self.moment: dict[int, torch.Tensor] = {}
        self.previous: StepRecord | None = None

    def add(self, step: int, sample: torch.Tensor, output: torch.Tensor) -> None:
        _, cond_in = guidance_halves(sample, self.unconditional_first)
        uncond, cond = ordered_halves(output.detach(), self.unconditional_first)
        record = StepRecord(cond_in.detach(), cond, uncond)
        if step in self.steps:
            basis = torch.stack([t.double().reshape(-1) for t in terms(step, record, self.previous)])
            gram, moment = basis @ basis.T, basis @ uncond.double().reshape(-1)
            self.gram[step] = self.gram.get(step, 0) + gram
            self.moment[step] = self.moment.get(step, 0) + moment
        self.previous = record

    def solve(self, step: int) -> list[float]:
        if step not in self.gram:
            raise MethodError(f"the calibration run never reached step {step}: predict steps the plan runs")
        gram = self.gram[step]
        energy = max(float(torch.trace(gram)) / len(gram), 1e-12)
        weights = torch.linalg.solve(gram + RIDGE * energy * torch.eye(len(gram), dtype=gram.dtype), self.moment[step])
        return [float(f"{w:.{DIGITS}g}") for w in weights.tolist()]


@torch.no_grad()
def fit_guidance(pipe: Any, plan: Plan, steps: Iterable[int],
                 calls: Workload | Iterable[dict] | Callable[[Any], Any] | None = None,
                 unconditional: Literal["first", "second"] | None = None) -> Plan:
    """``plan`` with its unconditional guidance branch predicted at ``steps`` (0-based denoiser
    evaluations), the weights fitted on one run of the calibration workload ``calls`` (the embedded
    pipelines' default if None; any callable ``calls(pipe)`` too) under ``plan`` without prediction.
    ``unconditional``: the half of the guidance batch that is unconditional (default: by pipeline)."""
    steps = sorted(set(steps))
    if not steps:
        raise MethodError("give at least one step to predict the unconditional branch at")
    half = unconditional or unconditional_half(pipe)
    validated(Plan, {**plan.model_dump(), "guidance": {"unconditional": half, "steps": [
        {"step": s, "weights": [0.0] * (2 if s == 0 else 5)} for s in steps]}},
        f"guidance prediction at steps {steps} of this plan", MethodError)
    calibrate = calls if callable(calls) else calibration_workload(calls, pipe, num_steps=plan.num_steps or 50)
    base = plan.model_copy(update={"guidance": None})
    model, _ = find_denoiser(pipe)
    sums = _Sums(set(steps), half == "first")
    signature, sample_arg = inspect.signature(model.forward), adapter_for(model).sample_arg
    forward, own = model.forward, vars(model).get("forward")

    @functools.wraps(forward)  # the executor binds the model's own signature
    def recording(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        step = model._diffaccel_executor.current_step
        if step is not None:
            sums.add(step, signature.bind(*args, **kwargs).arguments[sample_arg], model_sample(out))
        return out

    model.forward = recording  # the executor runs this as the model's own forward
    try:
        run_with_plan(pipe, calibrate, base)
    except PlanError as exc:
        raise MethodError(str(exc)) from None
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own
    prediction = GuidancePrediction(unconditional=half, steps=[PredictedStep(step=s, weights=sums.solve(s))
                                                               for s in steps])
    params = {**plan.params, "guidance": {"predicted_steps": steps}}
    return Plan.model_validate({**plan.model_dump(), "guidance": prediction.model_dump(), "params": params})

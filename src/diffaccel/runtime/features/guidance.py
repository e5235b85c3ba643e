"""Predicted unconditional guidance branch (adaptive guidance, LinearAG): at the plan's predicted
steps the model runs the conditional half of the classifier-free-guidance batch only, and the
unconditional half's output is a fitted linear combination of the step's conditional output and
input and of the step before's outputs and input. Half the step's MACs, no retraining."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from diffaccel.errors import PlanError
from diffaccel.plan import Plan
from diffaccel.runtime.features.base import Feature, batch_mapped, model_sample, with_model_sample
from diffaccel.runtime.state import BranchState


@dataclass
class StepRecord:
    """What a step computed: its input sample and the conditional and unconditional outputs."""

    sample: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor


def is_guidance_batch(sample: Any) -> bool:
    """Whether ``sample`` is a classifier-free-guidance batch: an even batch whose halves are the same sample."""
    return isinstance(sample, torch.Tensor) and sample.dim() > 0 and sample.shape[0] % 2 == 0 \
        and torch.equal(*sample.chunk(2))


def guidance_halves(sample: torch.Tensor, unconditional_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(unconditional, conditional) halves of a guidance batch; a clear error for a batch that is not
    one (an odd size, or halves with different samples: the pipeline runs without guidance)."""
    if not is_guidance_batch(sample):
        raise PlanError("a guidance prediction needs the pipeline to run classifier-free guidance as one doubled "
                        f"batch (both halves the same sample); this forward's batch of {sample.shape[0]} is not "
                        "one: the call runs without it (guidance_scale <= 1, or a model with guidance distilled "
                        "in, such as Flux's, which takes guidance_scale as an input): run with guidance_scale > 1 "
                        "on a pipeline with classifier-free guidance, or drop the plan's guidance section")
    return ordered_halves(sample, unconditional_first)


def ordered_halves(batch: torch.Tensor, unconditional_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(unconditional, conditional) halves of a guidance batch's input or output."""
    first, second = batch.chunk(2)
    return (first, second) if unconditional_first else (second, first)


def terms(step: int, record: StepRecord, previous: StepRecord | None) -> list[torch.Tensor]:
    """The quantities a predicted step's weights apply to, in the order of ``PredictedStep.weights``."""
    out = [record.cond, _like(record.sample, record.cond)]
    if step > 0:
        if previous is None:
            raise PlanError(f"guidance prediction at step {step} needs the step before, which this run did not make")
        out += [previous.uncond, previous.cond, _like(previous.sample, previous.cond)]
    return out


def _like(sample: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``sample`` shaped as the model's output: zero-padded channels for a model that also predicts
    its variance (more output than input channels)."""
    if sample.shape == output.shape:
        return sample
    extra = output.shape[1] - sample.shape[1]
    if extra > 0 and sample.shape[2:] == output.shape[2:]:
        return F.pad(sample, (0, 0) * (sample.dim() - 2) + (0, extra))
    raise PlanError(f"guidance prediction: the model's output {tuple(output.shape)} does not match its input "
                    f"{tuple(sample.shape)}")


@dataclass
class GuidanceState:
    previous: StepRecord | None = None


class PredictedGuidance(Feature):
    def __init__(self, plan: Plan, executor: Any) -> None:
        super().__init__(plan, executor)
        self.weights = {s.step: s.weights for s in plan.guidance.steps}
        self.unconditional_first = plan.guidance.unconditional == "first"

    @classmethod
    def applies(cls, plan: Plan) -> bool:
        return plan.guidance is not None

    @classmethod
    def part(cls, plan: Plan) -> Any:
        return plan.guidance

    def forward(self, original: Callable, bound: inspect.BoundArguments, state: BranchState) -> Any:
        executor, own = self.executor, state.of(self, GuidanceState)
        sample = bound.arguments[executor.adapter.sample_arg]
        _, cond_in = guidance_halves(sample, self.unconditional_first)
        if state.step not in self.weights:
            out = executor.run_forward(original, bound.args, bound.kwargs, state, tuple(sample.shape))
            uncond, cond = ordered_halves(model_sample(out), self.unconditional_first)
            own.previous = StepRecord(cond_in, cond, uncond)
            return out
        half = sample.shape[0] // 2
        keep = slice(half, None) if self.unconditional_first else slice(0, half)
        for name, value in list(bound.arguments.items()):
            bound.arguments[name] = halved(value, sample.shape[0], keep)
        # a throwaway branch state: the half batch computes every unit and leaves the caches as they were
        out = executor.run_forward(original, bound.args, bound.kwargs, BranchState(step=state.step),
                                   (half, *sample.shape[1:]))
        executor.stats.full_macs += executor.unit_macs[executor.mac_key][0] * half
        cond = model_sample(out)
        given = terms(state.step, StepRecord(cond_in, cond, cond), own.previous)  # its uncond is no term
        uncond = sum(w * t for w, t in zip(self.weights[state.step], given))
        own.previous = StepRecord(cond_in, cond, uncond)
        both = (uncond, cond) if self.unconditional_first else (cond, uncond)
        return with_model_sample(out, torch.cat(both))


def halved(value: Any, batch: int, keep: slice) -> Any:
    """``value`` with every tensor of the batch's size (in dicts, lists and tuples too) cut to ``keep``."""
    return batch_mapped(value, batch, lambda tensor: tensor[keep])


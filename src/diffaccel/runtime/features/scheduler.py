"""Plan settings that act on the latents between steps, through the scheduler's ``step``:
ERTACache's per-step scale of the solver update, and Faster Diffusion's prior noise injection."""

from __future__ import annotations

from typing import Any

import torch

from diffaccel.plan import Plan
from diffaccel.runtime.features.base import Feature


class StepScale(Feature):
    """``prev = sample + scale[step] * (prev - sample)``: lengthen or shorten a cached step's update."""

    needs_scheduler = True

    def __init__(self, plan: Plan, executor: Any) -> None:
        super().__init__(plan, executor)
        self.scale = plan.step_scale

    @classmethod
    def applies(cls, plan: Plan) -> bool:
        return plan.step_scale is not None

    @classmethod
    def part(cls, plan: Plan) -> Any:
        return plan.step_scale

    def after_step(self, step: int, sample: torch.Tensor, prev: torch.Tensor) -> None:
        scale = self.scale[step] if step < len(self.scale) else 1.0
        if scale != 1.0:
            prev.sub_(sample).mul_(scale).add_(sample)


class NoiseInjection(Feature):
    """Add ``strength * z_T`` (the run's initial noise: its first latent over the scheduler's
    ``init_noise_sigma``, 14.6 on SD's Euler) to the latent after every step from ``from_step`` on;
    under Heun or KDPM2 once a whole step, after its second evaluation."""

    needs_scheduler = True

    def __init__(self, plan: Plan, executor: Any) -> None:
        super().__init__(plan, executor)
        self.settings = plan.noise_injection
        self.z: torch.Tensor | None = None

    @classmethod
    def applies(cls, plan: Plan) -> bool:
        return plan.noise_injection is not None

    @classmethod
    def part(cls, plan: Plan) -> Any:
        return plan.noise_injection

    def start_run(self) -> None:
        self.z = None

    def after_step(self, step: int, sample: torch.Tensor, prev: torch.Tensor) -> None:
        scheduler = self.executor.scheduler
        if self.z is None:
            self.z = sample / float(getattr(scheduler, "init_noise_sigma", 1.0))
        if not getattr(scheduler, "state_in_first_order", True):
            return  # the first half of a second-order step: its latent is a prediction the step discards
        if step >= self.settings.from_step and self.settings.strength > 0:
            prev.add_(self.z, alpha=self.settings.strength)

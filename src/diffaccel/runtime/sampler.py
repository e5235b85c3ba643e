"""A plan's solver section on the user's pipeline: the scheduler that replaces the pipeline's own
while the plan applies (the executor patches it in, and restores the pipeline's on exit)."""

from __future__ import annotations

from typing import Any

import torch

from diffaccel.adapters import Adapter
from diffaccel.errors import PlanError
from diffaccel.plan import Plan
from diffaccel.solvers.calls import slices_schedule
from diffaccel.solvers.schedulers import solver_scheduler


def plan_scheduler(plan: Plan, pipe: Any, adapter: Adapter, model: torch.nn.Module) -> Any:
    """The scheduler that runs ``plan``'s solver section on ``pipe`` (refused where it cannot run)."""
    if pipe is None or not hasattr(pipe, "scheduler"):
        raise PlanError("this plan sets the sampler (its solver section): pass the pipeline, not the model")
    if plan.solver.bottleneck and "any-resolution" not in adapter.capabilities:
        raise PlanError(f"bottleneck sampling changes the latent size mid-run; the {adapter.name} adapter's model "
                        "does not support it (DiT and PixArt transformers do)")
    return solver_scheduler(plan.solver, pipe.scheduler, slices_schedule(pipe), adapter.size_multiple(model))

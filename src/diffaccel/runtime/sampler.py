"""A plan's solver section on the user's pipeline: the scheduler that replaces the pipeline's own
while the plan applies (the executor patches it in, and restores the pipeline's on exit)."""

from __future__ import annotations

from typing import Any

import torch

from diffaccel.adapters import Adapter
from diffaccel.errors import PlanError
from diffaccel.plan import Plan
from diffaccel.solvers.calls import slices_schedule
from diffaccel.solvers.schedulers import release_planned_steps, solver_scheduler


def plan_scheduler(plan: Plan, pipe: Any, adapter: Adapter, model: torch.nn.Module) -> Any:
    """The scheduler that runs ``plan``'s solver section on ``pipe`` (refused where it cannot run)."""
    if pipe is None or not hasattr(pipe, "scheduler"):
        raise PlanError("this plan sets the sampler (its solver section): pass the pipeline, not the model")
    if plan.solver.bottleneck and "any-resolution" not in adapter.capabilities:
        raise PlanError(f"bottleneck sampling changes the latent size mid-run; the {adapter.name} adapter's model "
                        "does not support it (DiT and PixArt transformers do)")
    scheduler = solver_scheduler(plan.solver, pipe.scheduler, slices_schedule(pipe), adapter.size_multiple(model))
    scheduler.save_pretrained = refuse_save  # ours, made for this install: ``release_plan_scheduler`` takes it off
    return scheduler


def refuse_save(*args: Any, **kwargs: Any) -> None:
    """pipe.scheduler is the plan's while the plan is applied: a save would record it as the pipeline's."""
    raise PlanError("pipe.scheduler is the plan's solver while the plan is applied, and the pipeline would be saved "
                    "with it: save the pipeline before applying the plan or after removing it")


def release_plan_scheduler(scheduler: Any) -> None:
    """The plan is removed: its scheduler, which a pipeline made from the user's may still hold, stops
    forcing the plan's step count (``release_planned_steps``)."""
    if scheduler is not None:
        release_planned_steps(scheduler)
        vars(scheduler).pop("save_pretrained", None)

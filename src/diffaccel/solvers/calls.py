"""What a pipeline and its calls ask of a plan's solver: the requests a solver section would
silently override or the pipeline would misread, and the samplers no deterministic solver can follow."""

from __future__ import annotations

import inspect
from typing import Any

from diffaccel.errors import PlanError
from diffaccel.solvers.spec import SolverSpec


def added_noise(scheduler: Any, calls: list[dict]) -> str | None:
    """Why ``scheduler``, run on ``calls``, adds fresh noise at every step (ancestral, SDE, DDPM, DDIM
    with ``eta`` > 0), or None: no deterministic solver can follow such a trajectory."""
    name = type(scheduler).__name__
    if "Ancestral" in name or "SDE" in name or name == "DDPMScheduler":
        return f"the pipeline's {name} adds fresh noise at every step"
    if scheduler.config.get("stochastic_sampling"):
        return f"the pipeline's {name} samples stochastically (stochastic_sampling), adding fresh noise at every step"
    if "sde" in str(scheduler.config.get("algorithm_type", "")):
        return f"the pipeline's {name} runs {scheduler.config['algorithm_type']}, which adds fresh noise at every step"
    eta = max((float(c.get("eta") or 0) for c in calls), default=0.0)
    if eta > 0 and "eta" in inspect.signature(scheduler.step).parameters:
        return f"the calls' eta={eta:g} makes the pipeline's {name} add fresh noise at every step"
    return None


def slices_schedule(pipe: Any) -> bool:
    """Whether ``pipe`` uses its step count beyond ``set_timesteps``: image-to-image and inpainting
    pipelines take the last ``strength`` of a ``num_inference_steps``-step schedule."""
    return "strength" in inspect.signature(type(pipe).__call__).parameters


def check_call(spec: SolverSpec, num_inference_steps: int | None, timesteps: Any, sigmas: Any,
               exact_steps: bool) -> None:
    """Refuse what a pipeline call asks of the scheduler that the plan's solver would silently
    override or that the pipeline itself would misread."""
    if timesteps is not None or sigmas is not None:
        raise PlanError("the plan's solver section sets the timesteps: call the pipeline without timesteps= and "
                        "sigmas= (a pipeline that passes its own to its scheduler, as CogView4 does, cannot run a "
                        "solver section: use a plan without one)")
    if num_inference_steps is None or int(num_inference_steps) == spec.steps:
        return
    if exact_steps:
        raise PlanError(f"this pipeline uses num_inference_steps itself (its strength takes a part of the schedule): "
                        f"call it with num_inference_steps={spec.steps}, the steps of the plan's solver")
    if int(num_inference_steps) == 1:
        raise PlanError(f"a call with num_inference_steps=1 takes a one-step path in some pipelines (PixArt returns "
                        f"every step's clean-sample estimate): call it with num_inference_steps={spec.steps}, the "
                        "steps of the plan's solver")

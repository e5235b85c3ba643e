"""The verbs users call: ``accelerate(pipe, plan)`` (a context manager), ``enable`` and ``disable``."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from os import PathLike
from typing import Any

from diffaccel.adapters import find_denoiser
from diffaccel.errors import PlanError, PlanWarning, warn
from diffaccel.plan import Plan
from diffaccel.runtime.executor import NESTED, Executor
from diffaccel.runtime.guard import applied, check_not_stale, components

# schedulers that evaluate the model twice at some timestep of a run
REPEATS_TIMESTEPS = ("PNDMScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                     "KDPM2AncestralDiscreteScheduler")

# Per model and unit split, the unit MACs of each input shape measured by an earlier executor: only
# the first run of a model pays the FLOP-counted forward, not every ``with accelerate(...)`` block.
_UNIT_MACS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def accelerate(target: Any, plan: Plan, check_finite: bool = True, resample: bool = False,
               denoiser: str | None = None) -> Iterator[Executor]:
    """Apply ``plan`` to a pipeline (its denoiser: ``pipe.transformer`` / ``pipe.unet``, the one
    supported model component, or the component named by ``denoiser``) or to a bare model inside
    the ``with`` block; the model and scheduler are restored on exit, also after an exception.

    ``resample``: run a static plan at another step count by mapping it (``Plan.resample``; logged)
    instead of refusing the run. ``check_finite``: stop on NaN/inf in the denoiser's output, naming the
    computed unit it came from (one host sync per denoiser call; turn off for the last bit of GPU speed)."""
    executor = enable(target, plan, check_finite, resample, denoiser)
    try:
        yield executor
        _check_short_run(executor)
    finally:
        executor.remove()


def enable(target: Any, plan: Plan, check_finite: bool = True, resample: bool = False,
           denoiser: str | None = None) -> Executor:
    """Apply ``plan`` until ``disable(target)``; returns the executor (its ``stats`` count the work
    of the latest pipeline call)."""
    plan = _checked(plan)
    check_not_stale(target)
    model, scheduler = find_denoiser(target, denoiser)
    if getattr(model, "_diffaccel_executor", None) is not None:  # before the weights check: a quantized model's differ
        raise PlanError(NESTED)
    if scheduler is None and not plan.step_free:
        _check_bare_model(plan, resample)
    measured = _UNIT_MACS.setdefault(model, {})
    key = (plan.granularity, tuple(plan.units))
    executor = Executor(model, plan, check_finite=check_finite, resample=resample, unit_macs=measured.get(key))
    measured[key] = executor.unit_macs  # the executor's own table: the shapes it measures are remembered
    executor.install(scheduler, target if model is not target else None)
    return executor


def _checked(plan: Any) -> Plan:
    """``plan`` validated again: one edited with ``model_copy(update=...)`` skipped pydantic's checks."""
    if isinstance(plan, Plan):
        return Plan.from_dict(plan.model_dump(warnings=False))
    if type(plan).__name__ == "LMPlan":
        raise PlanError("an LMPlan runs on a diffusion-LM pipeline through diffaccel.accelerate(lm_pipe, plan); "
                        "enable takes the plans of image pipelines")
    hint = ("read the file with Plan.load(path) (diffaccel.accelerate takes paths)" if isinstance(plan, (str, PathLike))
            else "make one with a method (diffaccel.methods), a search, or Plan.load('plan.json')")
    raise PlanError(f"a plan must be a diffaccel Plan, got {type(plan).__name__}: {hint}")


def _check_bare_model(plan: Plan, resample: bool) -> None:
    """A step-indexed plan on a model without its pipeline: steps are counted from the timesteps the
    model sees, and a repeated timestep is taken for another guidance branch, which misreads the
    schedulers that evaluate a timestep twice (PNDM's first steps, Heun's and KDPM2's every step).
    A run's step count is known only to the scheduler, so such a plan cannot be resampled."""
    if resample:
        raise PlanError("resample=True maps a plan onto each run's step count, which only the pipeline's scheduler "
                        "tells: apply the plan to the pipeline (accelerate(pipe, plan, resample=True)), or make it "
                        "for the step count the model runs")
    fitted = plan.calibration.scheduler if plan.calibration is not None else None
    if fitted in REPEATS_TIMESTEPS:
        raise PlanError(f"this plan was made under {fitted}, which evaluates some timesteps twice; applied to the "
                        "model alone, those evaluations would be taken for guidance branches: apply it to the "
                        "pipeline (accelerate(pipe, plan))")
    warn(PlanWarning("a step-indexed plan applied to the model alone counts steps from the timesteps it "
                     "sees; under a scheduler that evaluates a timestep twice (PNDM, Heun, KDPM2) apply it "
                     "to the pipeline instead"))


def disable(target: Any) -> None:
    """Remove whatever plan is applied to ``target``'s models (a no-op if none is), also one applied to a
    denoiser the pipeline no longer holds (replaced meanwhile)."""
    executors = [*applied(target), getattr(target, "_diffaccel_executor", None)]
    executors += [getattr(m, "_diffaccel_executor", None) for m in components(target).values()]
    removed: list[Executor] = []
    for executor in executors:
        if isinstance(executor, Executor) and not any(executor is done for done in removed):
            _check_short_run(executor)
            executor.remove()
            removed.append(executor)


def _check_short_run(executor: Executor) -> None:
    """A run that ended before the plan's last row ran its first rows without a word: on the model alone
    nothing tells a run's end, and a pipeline may stop early (SDXL's ``denoising_end``). Said when the
    plan is removed."""
    plan, steps = executor.plan, executor.stats.steps
    if plan.num_steps is None or not 0 < steps < plan.num_steps:
        return
    if executor.scheduler is None:
        warn(PlanWarning(f"the model ran at most {steps} steps under a plan for {plan.num_steps}: only the plan's "
                         f"first {steps} rows ran, and its quality figures do not hold; make the plan for {steps} "
                         "steps (applied to the pipeline, a run of another step count is refused, or mapped "
                         "with resample=True)"))
    else:
        warn(PlanWarning(f"the pipeline's last call stopped after {steps} of the plan's {plan.num_steps} steps "
                         "(denoising_end, or a callback that interrupts): only the plan's first rows ran, and its "
                         "quality figures do not hold"))

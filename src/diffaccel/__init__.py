"""diffaccel: cheaper diffusion sampling without retraining, with the quality cost measured.

    import diffaccel
    from diffaccel import methods

    plan = methods.fora(pipe, num_steps=28, interval=3)               # or a calibrated method:
    plan = methods.keysteps(pipe, calls=[{"prompt": p, "num_inference_steps": 28} for p in prompts], keys=10)
    plan = diffaccel.find_plan(pipe, calls=calls, budget="psnr>=30")  # or search for one
    with diffaccel.accelerate(pipe, plan) as run:
        images = pipe(prompt="...", num_inference_steps=28).images
    print(run.stats.mac_ratio)
"""

import time as _time

IMPORT_STARTED = _time.time()  # the command line's time limits count the imports that follow (torch, diffusers)

from contextlib import AbstractContextManager
from os import PathLike
from typing import Any

from diffaccel.errors import DiffaccelError, PlanError, SearchWarning
from diffaccel.lm import LMPlan, lm_accelerate
from diffaccel.plan import Plan
from diffaccel.runtime import Executor, PlanWarning, disable, enable
from diffaccel.runtime import accelerate as accelerate_denoiser
from diffaccel.search.run import find_plan

__version__ = "0.2.0"
__all__ = ["DiffaccelError", "Executor", "LMPlan", "Plan", "PlanError", "PlanWarning", "SearchWarning", "accelerate",
           "disable", "enable", "find_plan"]


def accelerate(target: Any, plan: Plan | LMPlan | str | PathLike, **options: Any) -> AbstractContextManager:
    """Apply ``plan`` inside a ``with`` block, restoring everything on exit: an image ``Plan`` to a
    diffusers pipeline or model (``diffaccel.runtime.accelerate``, whose ``options`` it takes), an
    ``LMPlan`` to a diffusion-LM pipeline (``diffaccel.lm.lm_accelerate``); a path is read as the
    target's kind of plan file. A plan of one kind on a target of the other is refused before
    anything changes."""
    if isinstance(plan, str) and plan.lstrip().startswith("{"):
        raise PlanError("accelerate got a plan's JSON text, not a path: pass Plan.model_validate_json(text) (or "
                        "LMPlan's), or the path of a plan file")
    if isinstance(plan, (str, PathLike)):
        plan = LMPlan.load(plan) if getattr(target, "kind", None) == "dlm" else Plan.load(plan)
    if isinstance(plan, LMPlan) or getattr(target, "kind", None) == "dlm":
        if options:
            raise PlanError(f"an LM plan takes no options ({', '.join(options)})")
        return lm_accelerate(target, plan)
    return accelerate_denoiser(target, plan, **options)

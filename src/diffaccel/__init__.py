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

from diffaccel.errors import DiffaccelError, PlanError
from diffaccel.plan import Plan
from diffaccel.runtime import Executor, PlanWarning, accelerate, disable, enable
from diffaccel.search.run import find_plan

__version__ = "0.2.0"
__all__ = ["DiffaccelError", "Executor", "Plan", "PlanError", "PlanWarning", "accelerate", "disable", "enable",
           "find_plan"]

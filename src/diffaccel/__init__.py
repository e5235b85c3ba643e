"""diffaccel: cheaper diffusion sampling without retraining, with the quality cost measured.

    plan = diffaccel.methods.fora(pipe.transformer, num_steps=50, interval=3)
    with diffaccel.accelerate(pipe, plan) as run:
        images = pipe(labels, num_inference_steps=50).images
    print(run.stats.mac_ratio)
"""

from diffaccel.plan import Plan, PlanError
from diffaccel.runtime import Executor, accelerate, disable, enable

__version__ = "0.1.0"
__all__ = ["Executor", "Plan", "PlanError", "accelerate", "disable", "enable"]

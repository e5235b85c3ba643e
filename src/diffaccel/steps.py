"""How many denoiser evaluations a run of N inference steps makes, for a given scheduler.

A plan counts denoiser evaluations: N for DDIM, DPM-Solver and Euler, N + 1 for PNDM (it repeats a
timestep), 2N - 1 for Heun and KDPM2 (two evaluations per step but the first). A fresh scheduler
of the same class and config is asked, so the user's scheduler is left untouched.
"""

from __future__ import annotations

from typing import Any

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler


def model_evaluations(scheduler: Any, num_inference_steps: int) -> int:
    """Denoiser evaluations of a run of ``num_inference_steps`` with ``scheduler`` (that count if
    the scheduler cannot tell without the pipeline's own arguments)."""
    if scheduler is None or not hasattr(scheduler, "set_timesteps"):
        return num_inference_steps
    try:
        probe = type(scheduler).from_config(scheduler.config)
        probe.set_timesteps(num_inference_steps)
        return len(probe.timesteps)
    except Exception:  # noqa: BLE001 -- e.g. flow-matching schedulers that need the pipeline's mu
        return num_inference_steps


def scheduler_like(scheduler: Any, sampler: str) -> Any:
    """A ``ddim`` or ``dpm`` (DPM-Solver++ 2M) scheduler on ``scheduler``'s noise schedule."""
    if sampler == "ddim":
        return DDIMScheduler.from_config(scheduler.config)
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown sampler {sampler!r}; choose ddim or dpm")

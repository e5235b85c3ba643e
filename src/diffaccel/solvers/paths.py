"""The noise path a scheduler samples: how much signal (alpha) and noise (sigma) a timestep holds,
and the clean-sample estimate a model output implies there. A variance-preserving (betas) schedule
has alpha = sqrt(alpha_bar[t]) and sigma = sqrt(1 - alpha_bar[t]); a flow-matching one (SD3, Flux)
has sigma = t / num_train_timesteps and alpha = 1 - sigma, and its model predicts the velocity
noise - x_0."""

from __future__ import annotations

from typing import Any

import torch


def is_flow(scheduler: Any) -> bool:
    """Whether ``scheduler`` samples a flow-matching path (no betas; sigmas from 1 down to 0)."""
    if getattr(scheduler, "flow_path", False):  # a plan's flow solver (solvers/flow.py), or a wrapper of one
        return True
    config = dict(scheduler.config)
    if config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
        return True
    return "shift" in config and "beta_schedule" not in config and hasattr(scheduler, "time_shift")


def noise_levels(scheduler: Any, timestep: Any) -> tuple[float, float]:
    """(alpha, sigma) of ``timestep`` on ``scheduler``'s path."""
    t = float(timestep)
    if is_flow(scheduler):
        sigma = t / scheduler.config.num_train_timesteps
        return 1.0 - sigma, sigma
    bar = float(scheduler.alphas_cumprod[int(round(t))])
    return bar ** 0.5, (1 - bar) ** 0.5


def clean_estimate(scheduler: Any, timestep: Any, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The clean sample ``model_output`` implies at ``timestep``, whatever the model predicts."""
    alpha, sigma = noise_levels(scheduler, timestep)
    if is_flow(scheduler):
        return sample - sigma * model_output
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return (sample - sigma * model_output) / alpha
    if kind == "v_prediction":
        return alpha * sample - sigma * model_output
    return model_output

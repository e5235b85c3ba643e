"""The timestep the denoiser is told, apart from the one its solver steps at (``SolverSpec.model_timesteps``).

A few-step solver's samples sit off the trajectory the model was trained on: at the solver's
timestep the sample is noisier or cleaner than the model expects (the exposure bias that
time-shift samplers and timestep tuners correct). Telling the model a nearby timestep that better
matches the sample, while the solver keeps its own, gave a fitted 5-step sampler on the embedded
U-Net +0.4 to +0.8 dB (``benchmarks/model_time_probe.py``). The wrapper shows the pipeline the told
timesteps (what it passes to the denoiser) and maps each back to the solver's own when the pipeline
steps (the told value's position among the told ones), so the solver, its step counting and any
fitted coefficients see their own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diffaccel.errors import PlanError
from diffaccel.solvers.corrected import show_inner_step


class ModelTime:
    """Wraps a scheduler whose run has ``len(told)`` steps: its ``timesteps`` read as ``told``, and
    ``step`` / ``scale_model_input`` given a told timestep run at the solver's own one there.
    Everything else is the wrapped scheduler's."""

    def __init__(self, inner: Any, told: Sequence[int]):
        self.inner, self.told = inner, tuple(int(t) for t in told)
        show_inner_step(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def timesteps(self) -> torch.Tensor:
        own = self.inner.timesteps
        return torch.tensor(self.told, dtype=own.dtype, device=own.device)

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        self.inner.set_timesteps(*args, **kwargs)
        if len(self.inner.timesteps) != len(self.told):
            raise PlanError(f"the plan tells the denoiser {len(self.told)} timesteps but its solver ran "
                            f"{len(self.inner.timesteps)} steps: model_timesteps needs one per step")

    def own(self, timestep: Any) -> Any:
        """The solver's timestep at the position of the told ``timestep``."""
        value = int(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else int(timestep)
        if value not in self.told:
            raise PlanError(f"the pipeline stepped at timestep {value}, which is not one the plan tells the "
                            f"denoiser ({list(self.told)}): it must loop over the scheduler's timesteps")
        mapped = self.inner.timesteps[self.told.index(value)]
        return mapped.to(timestep.device) if isinstance(timestep, torch.Tensor) else mapped

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return self.inner.scale_model_input(sample, None if timestep is None else self.own(timestep))

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.inner.step(model_output, self.own(timestep), sample, *args, **kwargs)

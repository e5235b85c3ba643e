"""The solver section of a plan: which sampler runs, at how many steps, on which timestep
spacing, and from where the trajectory starts. Pure data, like the rest of a plan."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SOLVERS = ("ddim", "euler", "dpm++1", "dpm++2", "dpm++3", "unipc", "evodiff")
Spacing = Literal["trailing", "leading", "linspace"]


class SolverSpec(BaseModel):
    """Run the pipeline with ``name`` at ``steps`` steps instead of its own scheduler and step count.

    ``start`` < 1 truncates the trajectory (an informed start): one model evaluation at the first
    timestep estimates the clean sample, which is noised again to the timestep at fraction
    ``start`` of the schedule, and the remaining ``steps`` steps run from there (the schedule is the
    one ``steps / start`` steps would have, minus its first part)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["ddim", "euler", "dpm++1", "dpm++2", "dpm++3", "unipc", "evodiff"] = "ddim"
    steps: int = Field(20, ge=1, le=1000, description="solver steps (num_inference_steps)")
    spacing: Spacing | None = Field(None, description="timestep spacing (default: the pipeline's)")
    start: float = Field(1.0, gt=0, le=1, description="fraction of the trajectory run (1: from pure noise)")

    @property
    def evaluations(self) -> int:
        """Denoiser evaluations of a run (plus one for the estimate of an informed start)."""
        return self.steps + (1 if self.start < 1 else 0)

    @property
    def label(self) -> str:
        text = f"{self.name} {self.steps}"
        if self.spacing:
            text += f" {self.spacing}"
        return text + (f" from {self.start:g}" if self.start < 1 else "")

"""The solver section of a plan: which sampler runs, at how many steps, on which timestep
spacing, and from where the trajectory starts. Pure data, like the rest of a plan."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SOLVERS = ("ddim", "euler", "dpm++1", "dpm++2", "dpm++3", "unipc", "evodiff")
# solvers that read each step's noise level off the timestep list (DDIM assumes even steps)
PLACEABLE = ("euler", "dpm++1", "dpm++2", "dpm++3", "unipc", "evodiff")
Spacing = Literal["trailing", "leading", "linspace"]
MAX_COEFFICIENT = 100.0  # fitted weights are O(0.1); past this a correction swamps the step it corrects
HISTORY = 3  # data predictions (the newest first) a fitted step's correction combines with its sample


def basis_size(step: int) -> int:
    """Terms of step ``step``'s fitted correction: its input sample and the data predictions so far
    (at most ``HISTORY``)."""
    return 1 + min(step + 1, HISTORY)


class SolverSpec(BaseModel):
    """Run the pipeline with ``name`` at ``steps`` steps instead of its own scheduler and step count.

    ``start`` < 1 truncates the trajectory (an informed start): one model evaluation at the first
    timestep estimates the clean sample, which is noised again to the timestep at fraction
    ``start`` of the schedule, and the remaining ``steps`` steps run from there (the schedule is the
    one ``steps / start`` steps would have, minus its first part)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: Literal["ddim", "euler", "dpm++1", "dpm++2", "dpm++3", "unipc", "evodiff"] = "ddim"
    steps: int = Field(20, ge=1, le=1000, description="solver steps (num_inference_steps)")
    spacing: Spacing | None = Field(None, description="timestep spacing (default: the pipeline's)")
    start: float = Field(1.0, gt=0, le=1, description="fraction of the trajectory run (1: from pure noise)")
    bottleneck: tuple[int, int, int] | None = Field(
        None, description="bottleneck sampling: steps at full, then reduced, then full resolution (sum = steps)")
    scale: int = Field(2, ge=2, le=4, description="bottleneck sampling: the reduced resolution is 1/scale")
    timesteps: tuple[int, ...] | None = Field(
        None, description="explicit timesteps, one per step, decreasing (a fitted schedule; default: the spacing's)")
    model_timesteps: tuple[int, ...] | None = Field(
        None, description="the timestep the denoiser is told at each step, one per step, decreasing (a fitted "
                          "shift off the solver's own, which it still steps at: solvers/model_time.py)")
    coefficients: tuple[tuple[float, ...], ...] | None = Field(
        None, description="fitted corrections, one row per step: the weights of its input sample and of the "
                          "newest data predictions added to the solver's step (solvers/corrected.py)")

    @field_validator("steps", "start", "scale", "bottleneck", "timesteps", "model_timesteps", mode="before")
    @classmethod
    def _no_true_false(cls, value: object) -> object:
        """JSON's true/false would pass as 1/0 (a bottleneck stage of ``true`` steps, ``start: true``)."""
        if isinstance(value, bool) or (isinstance(value, list | tuple) and any(isinstance(v, bool) for v in value)):
            raise ValueError("must be a number (or numbers), not a true/false value")
        return value

    @model_validator(mode="after")
    def _check(self) -> SolverSpec:
        if self.start < 1 and self.name == "euler":
            raise ValueError("an informed start needs a variance-preserving sampler (ddim, dpm++, unipc, evodiff), "
                             "not euler")
        if self.start < 1 and self.schedule_steps <= self.steps:
            raise ValueError(f"start {self.start:g} skips no step at {self.steps} steps (its schedule would have "
                             f"{self.schedule_steps}): the first timestep would run twice; use a start "
                             f"of at most {self.steps / (self.steps + 1):.3g}, or 1")
        if self.bottleneck is not None:
            if sum(self.bottleneck) != self.steps or min(self.bottleneck) < 1:
                raise ValueError(f"bottleneck stages {list(self.bottleneck)} must be >= 1 steps each and sum to "
                                 f"the {self.steps} steps")
            if self.name != "ddim" or self.start < 1:
                raise ValueError("bottleneck sampling runs with the ddim solver from the first step (its "
                                 "stages restart the trajectory at each resolution)")
        if self.timesteps is not None:
            ts = self.timesteps
            if len(ts) != self.steps or any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 0:
                raise ValueError(f"timesteps must be {self.steps} distinct decreasing values >= 0, one per step; "
                                 f"got {list(ts)}")
            if self.name not in PLACEABLE or self.spacing is not None or self.start < 1 or self.bottleneck:
                raise ValueError(f"explicit timesteps replace the spacing and run from the first step with one of "
                                 f"{', '.join(PLACEABLE)} (not {self.name}, a spacing, a start or a bottleneck)")
        if self.coefficients is not None:
            self._check_coefficients()
        if self.model_timesteps is not None:
            told = self.model_timesteps
            if len(told) != self.steps or any(a <= b for a, b in zip(told, told[1:])) or told[-1] < 0:
                raise ValueError(f"model_timesteps must be {self.steps} distinct decreasing values >= 0, one per "
                                 f"step; got {list(told)}")
            if self.start < 1 or self.bottleneck:
                raise ValueError("model_timesteps tell the denoiser one timestep per step of a run from the first "
                                 "step (not with an informed start or a bottleneck)")
        return self

    def _check_coefficients(self) -> None:
        rows = self.coefficients
        sizes = [basis_size(i) for i in range(self.steps)]
        if len(rows) != self.steps or [len(r) for r in rows] != sizes:
            raise ValueError(f"coefficients need one row per step of {sizes} weights each (the sample and the "
                             f"data predictions so far); got rows of {[len(r) for r in rows]}")
        if not all(math.isfinite(w) and abs(w) <= MAX_COEFFICIENT for row in rows for w in row):
            raise ValueError(f"coefficients must be finite numbers within +-{MAX_COEFFICIENT:g} (a fitted correction "
                             "is small: larger weights would swamp the solver's step)")
        if self.name == "euler" or self.start < 1 or self.bottleneck:
            raise ValueError("fitted coefficients correct a variance-preserving solver's steps from the first "
                             "step (not euler, an informed start or a bottleneck)")

    @property
    def schedule_steps(self) -> int:
        """Steps of the whole schedule whose tail the run takes (``steps`` from the first step)."""
        return round(self.steps / self.start)

    @property
    def evaluations(self) -> int:
        """Denoiser evaluations of a run (plus one for the estimate of an informed start)."""
        return self.steps + (1 if self.start < 1 else 0)

    @property
    def label(self) -> str:
        text = f"{self.name} {self.steps}"
        if self.spacing:
            text += f" {self.spacing}"
        text += f" from {self.start:g}" if self.start < 1 else ""
        if self.timesteps:
            text += " fitted " + "/".join(map(str, self.timesteps))
        if self.bottleneck:
            text += f" bottleneck {'/'.join(map(str, self.bottleneck))} at 1/{self.scale}"
        if self.coefficients:
            text += " + fitted coefficients"
        if self.model_timesteps:
            text += " + model timesteps " + "/".join(map(str, self.model_timesteps))
        return text

"""The Plan: a validated, versioned, JSON description of what one sampling run computes.

For every denoising step and every cacheable unit of the model the plan holds an action:

* ``C`` compute the unit,
* ``R`` reuse its last computed output (or, for residual units, add its last residual),
* ``F`` forecast it by Taylor extrapolation from its last computed outputs.

A plan may instead carry a runtime ``rule`` that decides reuse per step from the first blocks'
residual (the first-block / dual-block cache idea), or neither: then every unit computes at every
step (a quantization-only plan, or the identity). Plans are data: methods produce them, the
executor applies them, ``diffaccel plan show`` prints them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from diffaccel.errors import PlanError
from diffaccel.plan_files import json_types, read_plan_json, validated, write_plan_json
from diffaccel.quant.spec import QuantSpec
from diffaccel.resample import carry_per_step, carry_unit_steps, resample_rows
from diffaccel.solvers.spec import SolverSpec

PLAN_VERSION = 1
ACTIONS = {"C": "compute", "R": "reuse", "F": "forecast"}
BOUND = 100.0  # of a step scale or a correction gain: past it a hand-edited value overflows the run


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    _json_types = model_validator(mode="before")(json_types)


class ResidualRule(_Strict):
    """Decide reuse at run time: always compute the first ``first_blocks`` and last ``last_blocks``
    units; reuse the ones between when the first blocks' residual changed by less than
    ``threshold`` (relative L1) since the last computed step."""

    first_blocks: int = Field(1, ge=1)
    last_blocks: int = Field(0, ge=0)
    threshold: float = Field(0.1, gt=0)
    warmup: int = Field(2, ge=1, description="leading steps that always compute")
    max_consecutive: int = Field(3, ge=1, description="cap on consecutive reused steps")
    forecast_order: int = Field(0, ge=0, le=2, description="0: reuse; 1-2: Taylor forecast of the skipped units")


class Correction(_Strict):
    """Per-step linear correction of reused units, fitted offline (ERTACache): a reused residual
    ``r`` becomes ``gain[step] * r + bias[step]`` (bias per channel, or empty for none)."""

    gain: list[float]
    bias: list[list[float]] = Field(default_factory=list)


class FeatureFit(_Strict):
    """One reused (step, unit): its cached value ``v`` is served as ``gain * v (+ bias)``, per channel."""

    step: int = Field(ge=0)
    unit: str
    gain: list[float] = Field(min_length=1)
    bias: list[float] = Field(default_factory=list, description="empty: no bias")

    @model_validator(mode="after")
    def _check(self) -> FeatureFit:
        if self.bias and len(self.gain) != len(self.bias):
            raise ValueError(f"step {self.step}, unit {self.unit}: {len(self.gain)} gains for {len(self.bias)} biases")
        if not all(math.isfinite(v) for v in (*self.gain, *self.bias)):
            raise ValueError(f"step {self.step}, unit {self.unit}: gains and biases must be finite")
        return self


class FeatureCorrection(_Strict):
    """Per-channel linear correction of cached features, fitted offline on calibration runs
    (CacheQuant's decoupled error correction): it maps what a unit computed at its last full step
    onto what it would compute at the reused step, and so also absorbs the quantization error the
    cached value carries. ``axis``: the channel axis of the cached tensors (-1 tokens x channels,
    1 for convolution maps)."""

    axis: int
    fits: list[FeatureFit] = Field(default_factory=list)


class NoiseInjection(_Strict):
    """Faster Diffusion's prior noise injection: add ``strength * z_T`` to the latent after every
    step from ``from_step`` on (needs a pipeline, whose scheduler step is where latents change)."""

    strength: float = Field(0.003, ge=0)
    from_step: int = Field(0, ge=0)


class PredictedStep(_Strict):
    """One step whose unconditional branch is predicted: ``weights`` over the step's conditional
    output and input sample, then (after the first step) the step before's unconditional output,
    conditional output and input sample."""

    step: int = Field(ge=0)
    weights: list[float]

    @model_validator(mode="after")
    def _check(self) -> PredictedStep:
        size = 2 if self.step == 0 else 5
        if len(self.weights) != size:
            raise ValueError(f"step {self.step} needs {size} weights, got {len(self.weights)}")
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"step {self.step}: weights must be finite")
        return self


class GuidancePrediction(_Strict):
    """Classifier-free guidance with the unconditional branch predicted at some steps (adaptive
    guidance, LinearAG): the model runs the conditional half of the doubled batch only, and the
    unconditional output is a linear combination of what the step and the one before computed, with
    weights fitted on calibration runs (``methods.fit_guidance``). ``unconditional``: which half of
    the batch the pipeline gives the unconditional branch (diffusers' text-to-image pipelines the
    first, ``DiTPipeline`` the second)."""

    unconditional: Literal["first", "second"] = "first"
    steps: list[PredictedStep] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> GuidancePrediction:
        steps = [s.step for s in self.steps]
        if steps != sorted(set(steps)):
            raise ValueError(f"predicted steps must be distinct and in order, got {steps}")
        return self

    @property
    def predicted(self) -> set[int]:
        return {s.step for s in self.steps}


class CalibrationInfo(_Strict):
    """What a calibrated plan was fitted on: the pipeline calls and the weights. Applying the plan
    to other weights warns (refuses, for calibrated quantization)."""

    weights: str = Field(description="fingerprint of the denoiser's weights (``diffaccel.fingerprint``)")
    calls: int = Field(ge=0, description="pipeline calls run")
    images: int = Field(ge=0)
    inputs: list[str] = Field(default_factory=list, description="the distinct classes or prompts, as given")
    seeds: str = ""
    steps: int | None = Field(None, ge=1, description="denoiser evaluations per call")
    scheduler: str | None = Field(None, description="the pipeline's scheduler class (another one warns)")
    scheduler_config: dict[str, Any] | None = Field(
        None, description="that scheduler's settings (the same class with other settings warns, naming them)")


class Plan(_Strict):
    version: Literal[1] = PLAN_VERSION
    adapter: str = Field(description="adapter that defines the units, e.g. 'dit' or 'unet'")
    model_class: str = Field(description="the diffusers class the plan was made for")
    units: list[str] = Field(min_length=1, description="unit names, in adapter order")
    granularity: Literal["block", "component"] = "block"
    sampler: str | None = Field(None, description="descriptive only (older plan files say 'ddim' whatever ran): a "
                                                   "calibrated plan records its scheduler in calibration.scheduler")
    num_steps: int | None = Field(None, ge=1, description="steps of the static schedule; None for rule plans")
    timesteps: list[float] | None = Field(None, description="the scheduler timesteps the plan was made for")
    schedule: list[str] | None = Field(None, description="one string per step, one action letter per unit")
    rule: ResidualRule | None = None
    forecast_order: int = Field(1, ge=1, le=2, description="Taylor order used by 'F' actions")
    parallel_decode: bool = Field(False, description="batch consecutive decoder-only steps (U-Net)")
    noise_injection: NoiseInjection | None = None
    correction: Correction | None = None
    feature_correction: FeatureCorrection | None = None
    step_scale: list[float] | None = Field(None, description="per-step factor on the solver update (ERTACache)")
    quant: QuantSpec | None = Field(None, description="run the model's layers quantized (calibration file beside)")
    precision: Literal["bfloat16", "float16"] | None = Field(
        None, description="run the denoiser under torch.autocast at this dtype (None: in its own dtype)")
    calibration: CalibrationInfo | None = Field(None, description="what the plan was fitted on, if anything")
    solver: SolverSpec | None = Field(None, description="run this sampler at these steps instead of the pipeline's")
    guidance: GuidancePrediction | None = Field(None, description="steps that run the conditional branch only")
    method: str = "custom"
    params: dict = Field(default_factory=dict, description="the method's settings, for the record")

    @field_validator("num_steps", mode="before")
    @classmethod
    def _a_number(cls, value: object) -> object:
        if isinstance(value, bool | str):  # "6" or true would pass as 6 or 1
            raise ValueError(f"num_steps must be a whole number, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> Plan:
        if self.schedule is not None and self.rule is not None:
            raise ValueError("a plan holds either a 'schedule' (static) or a 'rule' (dynamic), not both")
        if self.schedule is None and self.num_steps is not None:
            raise ValueError("num_steps goes with a schedule; a plan without one runs at any step count")
        if self.schedule is not None:
            if self.num_steps is None or len(self.schedule) != self.num_steps:
                raise ValueError(f"schedule has {len(self.schedule)} steps but num_steps is {self.num_steps}")
            for i, row in enumerate(self.schedule):
                if len(row) != len(self.units):
                    raise ValueError(f"step {i} of the schedule has {len(row)} actions for {len(self.units)} units")
                bad = sorted(set(row) - set(ACTIONS))
                if bad:
                    raise ValueError(f"unknown action {''.join(bad)!r} at step {i}; actions are "
                                     + ", ".join(f"{k} ({v})" for k, v in ACTIONS.items()))
            if set(self.schedule[0]) != {"C"}:
                raise ValueError("the first step must compute every unit (nothing is cached yet)")
        if self.rule is not None and self.rule.first_blocks + self.rule.last_blocks >= len(self.units):
            raise ValueError("rule computes every unit: first_blocks + last_blocks must leave units to skip")
        if self.solver is not None and self.num_steps is not None and self.num_steps != self.solver.evaluations:
            raise ValueError(f"the schedule has {self.num_steps} steps but the solver {self.solver.label} runs "
                             f"{self.solver.evaluations} denoiser evaluations")
        if self.timesteps is not None and self.num_steps is not None and len(self.timesteps) != self.num_steps:
            raise ValueError(f"{len(self.timesteps)} timesteps for {self.num_steps} steps")
        if self.timesteps is not None and any(b > a for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError("timesteps must not increase (a run goes from noise to the clean sample)")
        if self.step_scale is not None and len(self.step_scale) != self.num_steps:
            raise ValueError("step_scale needs one value per step")
        if self.step_scale is not None and not 0 < min(self.step_scale) <= max(self.step_scale) <= BOUND:
            raise ValueError(f"step_scale values must be positive and at most {BOUND:g} (each is a factor on a "
                             "step's update)")
        if (start := self.noise_injection.from_step if self.noise_injection else -1) >= (self.num_steps or 1e9):
            raise ValueError(f"noise_injection.from_step {start} is past the plan's {self.num_steps} steps: never acts")
        if self.correction is not None and self.num_steps is not None:
            if len(self.correction.gain) != self.num_steps or max(map(abs, self.correction.gain)) > BOUND:
                raise ValueError(f"correction.gain needs one value per step, each within +-{BOUND:g}")
            bias = self.correction.bias
            if bias and (len(bias) != self.num_steps or len({len(row) for row in bias}) != 1):
                raise ValueError("correction.bias needs one row per step, all of one width (the channels), or none")
        if self.feature_correction is not None:
            if self.schedule is None:
                raise ValueError("feature_correction needs a static schedule (it corrects its reused steps)")
            for fit in self.feature_correction.fits:
                if fit.unit not in self.units or fit.step >= self.num_steps:
                    raise ValueError(f"feature_correction names step {fit.step}, unit {fit.unit!r}, "
                                     "which the plan does not have")
                if self.schedule[fit.step][self.units.index(fit.unit)] == "C":
                    raise ValueError(f"feature_correction corrects step {fit.step}, unit {fit.unit!r}, "
                                     "which the plan computes")
        if self.guidance is not None:
            self._check_guidance(self.guidance)
        if self.precision is not None and self.quant is not None and self.quant.backend == "int8-dynamic":
            raise ValueError("the int8-dynamic backend (fbgemm) takes float32 activations: drop precision, or "
                             "quantize with the fake or int8 backend")
        return self

    def _check_guidance(self, guidance: GuidancePrediction) -> None:
        if self.rule is not None or self.parallel_decode:
            raise ValueError("a guidance prediction needs a static schedule without parallel decoding")
        steps = self.num_steps or (self.solver.evaluations if self.solver is not None else None)
        for step in guidance.predicted:
            if steps is not None and step >= steps:
                raise ValueError(f"guidance predicts step {step}; the plan has {steps} steps")
            if self.schedule is not None and set(self.schedule[step]) != {"C"}:
                raise ValueError(f"guidance predicts step {step}, where the schedule reuses units: a step "
                                 "that runs half the batch computes every unit")

    # -- reading ---------------------------------------------------------------------------------
    @property
    def step_free(self) -> bool:
        """True for plans that run at any step count (a rule, or compute-everything with quantization)."""
        return self.schedule is None

    def action(self, step: int, unit: int) -> str:
        return self.schedule[step][unit] if self.schedule is not None else "C"

    def served_units(self) -> frozenset[int]:
        """The units some step serves from their cache (reuse or forecast) instead of computing."""
        return frozenset(i for row in self.schedule or () for i, action in enumerate(row) if action != "C")

    def resample(self, num_steps: int) -> Plan:
        """The same plan for ``num_steps`` denoiser evaluations: each unit keeps its share of compute
        steps, placed where the plan placed them (the rule: ``diffaccel.resample``). Step-free plans
        come back unchanged; per-step settings follow the nearest old step of the same kind."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise PlanError(f"a plan needs at least one step, got {num_steps!r}")
        if self.step_free or self.num_steps == num_steps:
            return self
        if self.solver is not None:
            raise PlanError(f"this plan's solver section runs {self.solver.label} whatever steps the pipeline asks "
                            "for, and its schedule follows those steps: it is not resampled; make the plan (or "
                            "search it) for the other step count")
        if self.guidance is not None:
            raise PlanError(f"this plan's guidance prediction was fitted for {self.num_steps} steps: fit it "
                            f"again for {num_steps} steps")
        if self.quant is not None and self.quant.per_step:
            raise PlanError(f"this plan's quantization scales were calibrated per step for {self.num_steps} "
                            f"steps: calibrate it again for {num_steps} steps")
        rows = resample_rows(self.schedule, num_steps)
        update: dict = {"num_steps": num_steps, "schedule": rows, "timesteps": None,
                        "params": {**self.params, "resampled_from": self.num_steps}}
        if self.step_scale is not None:
            update["step_scale"] = carry_per_step(self.step_scale, self.schedule, rows, 1.0)
        if self.correction is not None:
            bias = self.correction.bias
            update["correction"] = Correction(
                gain=carry_per_step(self.correction.gain, self.schedule, rows, 1.0),
                bias=carry_per_step(bias, self.schedule, rows, [0.0] * len(bias[0])) if bias else [])
        if self.feature_correction is not None:
            update["feature_correction"] = self._carried_fits(rows)
        if self.noise_injection is not None:
            start = round(self.noise_injection.from_step * num_steps / self.num_steps)
            update["noise_injection"] = self.noise_injection.model_copy(update={"from_step": start})
        return Plan.from_dict({**self.model_dump(), **update})

    def _carried_fits(self, rows: list[str]) -> FeatureCorrection:
        by_step = {(fit.step, fit.unit): fit for fit in self.feature_correction.fits}
        has = [[s for s in range(self.num_steps) if (s, name) in by_step] for name in self.units]
        fits = [by_step[(old, self.units[u])].model_copy(update={"step": j})
                for j, u, old in carry_unit_steps(self.num_steps, rows, has)]
        return FeatureCorrection(axis=self.feature_correction.axis, fits=fits)

    def counts(self) -> dict[str, int]:
        """How many (step, unit) actions of each kind a static plan holds."""
        rows = "".join(self.schedule or [])
        return {name: rows.count(letter) for letter, name in ACTIONS.items()}

    # -- files -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)

    def save(self, path: str | Path) -> Path:
        """Write the plan, if valid; a quantization section's calibration file is copied beside it (as
        ``<name>.calibration.safetensors``) and named relative to it, so the folder travels whole."""
        path = Path(path)
        Plan.from_dict(self.model_dump())  # a plan edited with model_copy (unvalidated) that load would refuse
        if self.quant is None:
            return write_plan_json(path, self.to_json())
        source, target = Path(self.quant.calibration), path.parent / f"{path.stem}.calibration.safetensors"
        if not source.is_file():
            raise PlanError(f"the plan's calibration file {source} does not exist")
        plan = self.with_quant(self.quant.model_copy(update={"calibration": target.name}))
        return write_plan_json(path, plan.to_json(), beside=(source, target))

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        return validated(cls, data, "plan", PlanError)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        data = read_plan_json(path, "plan", PLAN_VERSION, PlanError)
        plan = cls.from_dict(data)
        if plan.quant is not None and not Path(plan.quant.calibration).is_absolute():
            # a calibration file named in a plan file lives beside it
            beside = (path.parent / plan.quant.calibration).resolve()  # absolute: the working folder may change
            located = plan.quant.model_copy(update={"calibration": str(beside)})
            plan = plan.model_copy(update={"quant": located})
        return plan

    def with_quant(self, quant: QuantSpec | None) -> Plan:
        """The same plan with another quantization section (joint caching + quantization plans)."""
        return self.model_copy(update={"quant": quant})

"""The schedulers a plan's solver section names, built on the pipeline's own noise schedule, and
the informed (truncated) start."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from diffaccel.errors import PlanError
from diffaccel.solvers.calls import check_call
from diffaccel.solvers.corrected import Corrected, Fitter, show_inner_step
from diffaccel.solvers.evodiff import EVODiffScheduler
from diffaccel.solvers.flow import flow_solver
from diffaccel.solvers.model_time import ModelTime
from diffaccel.solvers.paths import clean_estimate, is_flow
from diffaccel.solvers.spec import SolverSpec

CLASSES: dict[str, tuple[type, dict]] = {
    "ddim": (DDIMScheduler, {"clip_sample": False}),
    "euler": (EulerDiscreteScheduler, {}),
    "dpm++1": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 1}),
    "dpm++2": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "unipc": (UniPCMultistepScheduler, {}),
    "evodiff": (EVODiffScheduler, {}),
}


def solver_scheduler(spec: SolverSpec, base: Any, exact_steps: bool = False, size_multiple: int = 1,
                     fitter: Fitter | None = None) -> Any:
    """A scheduler running ``spec`` on ``base``'s noise schedule: its ``set_timesteps`` always sets
    ``spec.steps`` steps (whatever the pipeline asks for; with ``exact_steps``, for a pipeline that
    also uses its step count itself, another count is refused); with ``spec.start`` < 1 it is wrapped
    in an ``InformedStart``, with ``spec.coefficients`` (or a coefficient ``fitter``) in a ``Corrected``,
    with ``spec.bottleneck`` in a ``Bottleneck`` (whose reduced latent sizes must be multiples of
    ``size_multiple``), and last, with ``spec.model_timesteps``, in a ``ModelTime``: the corrections
    read the solver's own timesteps. On a flow-matching pipeline, ``flow.py``'s ``FlowSolver``."""
    if is_flow(base):
        return flow_solver(spec, base, exact_steps, fitter)
    config = dict(base.config)
    if "shift" in config and config.get("beta_schedule") is None:  # a flow path this code does not read
        raise PlanError(f"the flow solvers read the shift of FlowMatchEulerDiscreteScheduler; this pipeline's "
                        f"{type(base).__name__} is another flow-matching scheduler: set pipe.scheduler = "
                        "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), or leave the solver out")
    if config.get("beta_schedule") is None and config.get("trained_betas") is None:  # IPNDM has the key, as None
        raise PlanError(f"the solver {spec.name} needs a noise-schedule (betas) scheduler; this pipeline's "
                        f"{type(base).__name__} has none: leave the plan's solver out for it")
    cls, extra = CLASSES[spec.name]
    if "clip_sample" in config:  # the pipeline's own DDIM setting (a default for other schedulers' configs)
        extra = {k: v for k, v in extra.items() if k != "clip_sample"}
    if spec.spacing is not None:
        extra = {**extra, "timestep_spacing": spec.spacing}
    known = inspect.signature(cls.__init__).parameters  # the pipeline's scheduler may carry other keys
    # every value as the pipeline's scheduler runs it: diffusers' "_use_default_values" would make the new
    # class fall back to its own defaults for them (linspace spacing under a PNDM whose "leading" is a default)
    kept = {k: v for k, v in config.items() if (k in known or k.startswith("_")) and k != "_use_default_values"}
    scheduler = cls.from_config(kept, **extra)
    planned, timesteps = spec.schedule_steps, len(scheduler.alphas_cumprod)
    if planned > timesteps // 2:  # past it, multistep solvers repeat timesteps (NaN) and leading spacing overflows
        raise PlanError(f"the solver's {spec.steps} steps" + (f" from {spec.start:g}" if spec.start < 1 else "")
                        + f" make a {planned}-step schedule, more than half of this noise schedule's {timesteps} "
                        "timesteps: run fewer steps" + (" or start later" if spec.start < 1 else ""))
    for given in (spec.timesteps, spec.model_timesteps):
        if given is not None:
            _check_range(given, timesteps)
    _check_schedule(spec, scheduler)
    if exact_steps and (spec.start < 1 or spec.bottleneck is not None):
        raise PlanError("an informed start or a bottleneck runs the trajectory from pure noise; this pipeline starts "
                        "from an image (its strength picks a part of the schedule): leave them out of its plans")
    if spec.bottleneck is not None:
        return Bottleneck(scheduler, spec, exact_steps, size_multiple)
    if spec.start < 1:
        return InformedStart(scheduler, spec, exact_steps)
    set_timesteps = scheduler.set_timesteps

    def set_planned_timesteps(num_inference_steps: int | None = None, device: Any = None, timesteps: Any = None,
                              sigmas: Any = None, **kwargs: Any) -> None:
        check_call(spec, num_inference_steps, timesteps, sigmas, exact_steps)
        set_timesteps(spec.steps, device=device)
        if spec.timesteps is not None:
            place_timesteps(scheduler, spec.timesteps)

    set_planned_timesteps.diffaccel_planned = True  # release_planned_steps takes it off again
    scheduler.set_timesteps = set_planned_timesteps
    wrapped = Corrected(scheduler, spec.coefficients, fitter) if spec.coefficients is not None or fitter is not None \
        else scheduler
    return ModelTime(wrapped, spec.model_timesteps) if spec.model_timesteps is not None else wrapped


def release_planned_steps(scheduler: Any) -> None:
    """Take the plan's step count off ``scheduler`` once the plan is removed: a pipeline made from the
    one the plan was applied to (``from_pipe``, ``Pipeline(**pipe.components)``) may hold it still,
    and then runs the step counts it is called with (the solver and its schedule settings stay)."""
    while scheduler is not None:
        if getattr(vars(scheduler).get("set_timesteps"), "diffaccel_planned", False):
            del scheduler.set_timesteps
        scheduler = vars(scheduler).get("inner")


def _check_schedule(spec: SolverSpec, scheduler: Any) -> None:
    """Refuse a schedule diffusers would run wrong: at some step counts its trailing spacing's
    floating-point arithmetic makes one timestep too many, the last -1 (read as the noisiest), and
    one step under linspace or leading spacing lands at the bottom of the schedule, on pure noise."""
    if spec.timesteps is not None:
        return
    planned, top = spec.schedule_steps, len(scheduler.alphas_cumprod) - 1
    spacing = scheduler.config.get("timestep_spacing", "the pipeline's")
    if not _runs_at(scheduler, planned):
        got = scheduler.timesteps.clone()
        fine = [n for n in sorted(range(planned - 3, planned + 4), key=lambda n: abs(n - planned))
                if n >= 1 and n != planned and _runs_at(scheduler, n)][:2]
        what = f"{spec.steps} steps" + (f" from {spec.start:g} (a {planned}-step schedule)" if spec.start < 1 else "")
        raise PlanError(f"at {planned} steps this {spec.name} scheduler's {spacing} spacing gives {len(got)} "
                        f"timesteps, the last {int(got[-1])} (diffusers' rounding at this count: its own run at this "
                        f"count is as wrong), so {what} would run wrong: make the schedule "
                        f"{' or '.join(map(str, fine))} steps instead")
    first = int(scheduler.timesteps[0])  # _runs_at left the scheduler at the planned count
    if spec.steps == 1 and spec.start == 1 and spec.bottleneck is None and first < 0.9 * top:
        raise PlanError(f"one step under {spacing} spacing evaluates the model at timestep {first}, on pure noise "
                        f"meant for timestep {top}, and returns noise: give the solver spacing trailing (or more "
                        "steps)")


def _runs_at(scheduler: Any, steps: int) -> bool:
    """Whether ``scheduler`` set to ``steps`` steps gives that many timesteps, none negative."""
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps) == steps and int(scheduler.timesteps.min()) >= 0


def _check_range(timesteps: tuple[int, ...], count: int) -> None:
    if max(timesteps) >= count:
        raise PlanError(f"the plan's timesteps reach {max(timesteps)}; this noise schedule's run from 0 to {count - 1}")


def place_timesteps(scheduler: Any, timesteps: tuple[int, ...]) -> None:
    """Replace the timesteps ``set_timesteps`` chose by ``timesteps`` (same count), with the noise
    levels (sigmas) of the schedulers that keep them, computed as diffusers does for its own spacings,
    so that a scheduler's own timesteps given explicitly reproduce its run exactly (not where its own
    levels sit between whole timesteps: Karras sigmas, Euler's linspace spacing)."""
    bars = scheduler.alphas_cumprod
    _check_range(timesteps, len(bars))
    device = scheduler.timesteps.device
    index = torch.tensor(timesteps, dtype=torch.int64)
    if getattr(scheduler, "sigmas", None) is not None:
        sigmas = (((1 - bars) / bars) ** 0.5)[index]
        scheduler.sigmas = torch.cat([sigmas.float(), scheduler.sigmas[-1:].float().cpu()]).to(scheduler.sigmas.device)
    scheduler.timesteps = index.to(device=device, dtype=scheduler.timesteps.dtype)


class InformedStart:
    """Start the trajectory part-way (DiffusionDrive-style truncated start from a cheap prior): one
    model evaluation at the first timestep estimates the clean sample, which is noised again (with
    the run's own initial noise) to the first timestep of the tail of a ``steps / start``-step
    schedule; the wrapped scheduler runs that tail. Everything else is the wrapped scheduler's."""

    def __init__(self, inner: Any, spec: SolverSpec, exact_steps: bool = False) -> None:
        self.inner, self.spec, self.exact_steps = inner, spec, exact_steps
        self.timesteps = inner.timesteps
        self._jump, self._target = False, 0
        show_inner_step(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, timesteps: Any = None,
                      sigmas: Any = None, **kwargs: Any) -> None:
        check_call(self.spec, num_inference_steps, timesteps, sigmas, self.exact_steps)
        full = self.spec.schedule_steps
        self.inner.set_timesteps(full, device=device)
        skip = full - self.spec.steps
        if hasattr(self.inner, "set_begin_index"):
            self.inner.set_begin_index(skip)  # multistep solvers index their own (full) schedule
        tail = self.inner.timesteps[skip:]
        self._target, self._jump = int(tail[0]), True
        self.timesteps = torch.cat([self.inner.timesteps[:1], tail])

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample if self._jump else self.inner.scale_model_input(sample, timestep)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
             **kwargs: Any) -> Any:
        if not self._jump:
            return self.inner.step(model_output, timestep, sample, *args, **kwargs)
        self._jump = False
        bars = self.inner.alphas_cumprod
        x0 = clean_estimate(self.inner, timestep, model_output, sample)
        target = float(bars[self._target])
        prev = target ** 0.5 * x0 + (1 - target) ** 0.5 * sample  # the run's own noise, as the first latent
        return SchedulerOutput(prev_sample=prev) if kwargs.get("return_dict", True) else (prev,)


class Bottleneck:
    """Bottleneck sampling (high-low-high resolution) on DDIM: the first stage at full resolution,
    the middle stage at 1/scale of it, the last at full resolution again. At each transition the
    clean-sample estimate is resized (area down, bilinear up) and noised again to the next
    timestep, with the run's own initial noise resized alike (times ``scale`` going down, which
    keeps its variance); DDIM is stateless, so nothing else has to follow the resize."""

    def __init__(self, inner: Any, spec: SolverSpec, exact_steps: bool = False, size_multiple: int = 1) -> None:
        self.inner, self.spec, self.exact_steps, self.multiple = inner, spec, exact_steps, size_multiple
        self.timesteps = inner.timesteps
        self._index, self._noise = 0, None
        show_inner_step(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, timesteps: Any = None,
                      sigmas: Any = None, **kwargs: Any) -> None:
        check_call(self.spec, num_inference_steps, timesteps, sigmas, self.exact_steps)
        self.inner.set_timesteps(self.spec.steps, device=device)
        self.timesteps = self.inner.timesteps
        self._index, self._noise = 0, None

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
             **kwargs: Any) -> Any:
        i, self._index = self._index, self._index + 1
        if self._noise is None:
            self._check_size(sample.shape[-2:])
            self._noise = sample.clone()
        first, low, _ = self.spec.bottleneck
        if i not in (first - 1, first + low - 1):
            return self.inner.step(model_output, timestep, sample, *args, **kwargs)
        bars = self.inner.alphas_cumprod
        x0 = clean_estimate(self.inner, timestep, model_output, sample)
        full = self._noise.shape[-2:]
        if i == first - 1:  # down
            size = (full[0] // self.spec.scale, full[1] // self.spec.scale)
            x0 = F.interpolate(x0, size=size, mode="area")
            noise = F.interpolate(self._noise, size=size, mode="area") * self.spec.scale
        else:  # up
            x0 = F.interpolate(x0, size=full, mode="bilinear", align_corners=False)
            noise = self._noise
        target = float(bars[int(self.timesteps[i + 1])])
        prev = target ** 0.5 * x0 + (1 - target) ** 0.5 * noise
        return SchedulerOutput(prev_sample=prev) if kwargs.get("return_dict", True) else (prev,)

    def _check_size(self, full: torch.Size) -> None:
        """Refuse, at the first step, a latent size the reduced stage cannot run at."""
        step = self.spec.scale * self.multiple
        if full[0] % step or full[1] % step:
            patch = f" and the model's patch size {self.multiple}" if self.multiple > 1 else ""
            raise PlanError(f"bottleneck scale {self.spec.scale}{patch} need a latent size divisible by {step}; "
                            f"this run's is {full[0]}x{full[1]}: choose another scale (or image size)")

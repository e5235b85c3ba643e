"""Fitting a few-step solver's coefficients (``solvers/corrected.py``) to the reference trajectory.

The reference run (the pipeline's own sampler, e.g. 50 DDIM steps) is recorded once: its sample and
data prediction at each of its steps. They give the target of every step of a few-step run: the
reference's state at the step's next timestep, reached from the nearest recorded state above it by
one DDIM move (its data prediction and implied noise), and the reference's final sample for the
last step. Step k's weights solve a ridge least-squares problem over every pixel of every
calibration image (the corrected output against its target, the steps before k corrected already),
so the fit takes one calibration run per step and no gradients: the greedy, trajectory-matching
fit of PCA-corrected solvers, with the solver's own terms as the basis. Matching the trajectory
rather than the final image alone keeps each model evaluation where the reference made it, which is
what lets the weights carry over to other seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from diffaccel.calibration.reference import run_with_plan
from diffaccel.errors import SearchError
from diffaccel.plan import Plan
from diffaccel.solvers.corrected import show_inner_step
from diffaccel.solvers.paths import clean_estimate, is_flow, noise_levels
from diffaccel.solvers.schedulers import solver_scheduler
from diffaccel.solvers.spec import SolverSpec, basis_size

RIDGE = 1e-3  # the least squares' damping, relative to the basis' mean energy: keeps near-equal terms in check
DIGITS = 6  # significant digits of a fitted weight in the plan


class _Recorder:
    """Wraps the pipeline's scheduler for the reference run: per call, each step's timestep, sample
    and data prediction, and the final sample."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.calls: list[dict[str, list]] = []
        show_inner_step(self, "set_timesteps")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        self.inner.set_timesteps(*args, **kwargs)
        self.calls.append({"timesteps": [], "samples": [], "clean": [], "final": []})

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        call = self.calls[-1]
        call["timesteps"].append(float(timestep))
        call["samples"].append(sample.detach().float().cpu().clone())
        clean = clean_estimate(self.inner, timestep, model_output, sample)
        call["clean"].append(clean.detach().float().cpu())
        out = self.inner.step(model_output, timestep, sample, *args, **kwargs)
        prev = out[0] if isinstance(out, tuple) else out.prev_sample
        call["final"][:] = [prev.detach().float().cpu().clone()]
        return out


class ReferenceTrajectory:
    """The reference run's states, per pipeline call, and the targets read off them."""

    def __init__(self, calls: list[dict[str, list]], scheduler: Any):
        self.calls, self.scheduler = calls, scheduler  # its noise path: each timestep's alpha and sigma

    def target(self, call: int, timestep: float | None) -> torch.Tensor:
        """The reference's sample at ``timestep`` of call ``call`` (None: its final sample)."""
        if call >= len(self.calls):
            raise SearchError("the fit's run made more pipeline calls than the reference run: the calibration "
                              "workload must make the same calls each time")
        record = self.calls[call]
        if timestep is None:
            return record["final"][0]
        above = [k for k, t in enumerate(record["timesteps"]) if t >= timestep]
        k = above[-1] if above else 0
        (alpha_a, sigma_a), (alpha_b, sigma_b) = (noise_levels(self.scheduler, t) for t in (record["timesteps"][k],
                                                                                            timestep))
        clean, sample = record["clean"][k].double(), record["samples"][k].double()
        noise = (sample - alpha_a * clean) / sigma_a
        return (alpha_b * clean + sigma_b * noise).float()


def record_reference(pipe: Any, calibrate: Callable[[Any], Any]) -> ReferenceTrajectory:
    """One run of the calibration workload with the pipeline's own sampler, recorded."""
    own = pipe.scheduler
    betas = getattr(own, "alphas_cumprod", None) is not None and float(getattr(own, "init_noise_sigma", 1.0)) == 1.0
    if not (betas or is_flow(own)):
        raise SearchError(f"fitting solver coefficients needs a reference sampler on a noise schedule with "
                          f"variance-preserving samples (DDIM, DPM-Solver, UniPC, PNDM) or a flow-matching one; "
                          f"this pipeline's "
                          f"{type(own).__name__} is not one")
    recorder = _Recorder(own)
    pipe.scheduler = recorder
    try:
        calibrate(pipe)
    finally:
        pipe.scheduler = own
    return ReferenceTrajectory(recorder.calls, own)


class _StepFit:
    """A ``Fitter`` for one calibration run: the fitted rows before step ``k``, and the normal
    equations of step ``k``'s least squares, summed over the run's calls."""

    def __init__(self, reference: ReferenceTrajectory, rows: Sequence[Sequence[float]], k: int):
        self.reference, self.rows, self.k = reference, rows, k
        self.call = -1
        self.gram: torch.Tensor | None = None
        self.moment: torch.Tensor | None = None

    def begin(self) -> None:
        self.call += 1

    def weights(self, step: int, basis: list[torch.Tensor], prev: torch.Tensor,
                next_timestep: float | None) -> Sequence[float] | None:
        if step != self.k:
            return self.rows[step] if step < self.k else None
        target = self.reference.target(self.call, next_timestep)
        if target.shape != prev.shape:
            raise SearchError(f"the fit's samples {tuple(prev.shape)} do not match the reference run's "
                              f"{tuple(target.shape)}: the calibration workload must make the same calls each time")
        terms = torch.stack([b.detach().double().cpu().reshape(-1) for b in basis], 1)
        residual = (target.double() - prev.detach().double().cpu()).reshape(-1)
        gram, moment = terms.T @ terms, terms.T @ residual
        self.gram = gram if self.gram is None else self.gram + gram
        self.moment = moment if self.moment is None else self.moment + moment
        return None

    def solve(self) -> tuple[float, ...]:
        if self.gram is None:
            raise SearchError(f"the calibration run never reached step {self.k + 1}")
        size = len(self.gram)
        energy = max(float(torch.trace(self.gram)) / size, 1e-12)  # all-zero terms still solve (to zero)
        damping = RIDGE * energy * torch.eye(size, dtype=self.gram.dtype)
        weights = torch.linalg.solve(self.gram + damping, self.moment)
        return tuple(float(f"{w:.{DIGITS}g}") for w in weights.tolist())


def fit_coefficients(pipe: Any, calibrate: Callable[[Any], Any], spec: SolverSpec, reference: ReferenceTrajectory,
                     deadline: float | None = None, trajectory: bool = True,
                     plan: Plan | None = None) -> SolverSpec | None:
    """``spec`` with its steps' coefficients fitted to ``reference`` (recorded on ``calibrate``, the
    same workload), one calibration run per step; with ``trajectory`` False, only the last step's,
    to the final sample (one run: the other steps stay the solver's own, which suits a schedule whose
    fitted timesteps already lean on the solver's own errors cancelling). With ``plan`` (a caching
    schedule for ``spec``'s steps) the runs apply it, so that the weights also correct what its
    reuse changes. None when ``deadline`` passes first."""
    plain = spec.model_copy(update={"coefficients": None})
    try:
        SolverSpec.model_validate({**plain.model_dump(), "coefficients": [[0.0] * basis_size(i)
                                                                           for i in range(spec.steps)]})
    except ValueError as exc:
        raise SearchError(f"cannot fit coefficients for {spec.label}: {exc.errors()[0]['msg']}") from None
    own = pipe.scheduler
    rows: list[tuple[float, ...]] = [] if trajectory else [(0.0,) * basis_size(i) for i in range(spec.steps - 1)]
    try:
        for k in range(len(rows), spec.steps):
            if deadline is not None and time.time() >= deadline:
                return None
            fit = _StepFit(reference, rows, k)
            pipe.scheduler = solver_scheduler(plain, own, fitter=fit)
            if plan is None:
                calibrate(pipe)
            else:  # the executor counts steps on the scheduler in place: the fitting one
                run_with_plan(pipe, calibrate, plan.model_copy(update={"solver": None}))
            rows.append(fit.solve())
    finally:
        pipe.scheduler = own
    try:
        return SolverSpec.model_validate({**spec.model_dump(), "coefficients": rows})
    except ValueError:
        raise SearchError(f"the coefficient fit of {spec.label} gave non-finite weights (the calibration run's "
                          "samples are degenerate)") from None


def coefficient_fits(pipe: Any, calibrate: Callable[[Any], Any], spec: SolverSpec, reference: ReferenceTrajectory,
                     deadline: float | None = None, plan: Plan | None = None,
                     every: bool = True) -> Iterator[tuple[SolverSpec, str]]:
    """``spec`` with the last step's coefficients fitted (one run), then (if ``every``) with every
    step's (one run per step), under ``plan``'s caching if given, each with which it is ("the last
    step", "every step"). The every-step fit starts only if the first fit's run time says it ends
    before ``deadline``."""
    started = time.time()
    last = fit_coefficients(pipe, calibrate, spec, reference, deadline, False, plan)
    if last is None:
        return
    per_run = time.time() - started
    yield last, "the last step"
    if not every or (deadline is not None and time.time() + spec.steps * per_run >= deadline):
        return
    each = fit_coefficients(pipe, calibrate, spec, reference, deadline, True, plan)
    if each is not None:
        yield each, "every step"

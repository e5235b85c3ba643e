"""Fitted solver coefficients: the correction each step adds, its fit to the reference trajectory,
and its place in the joint search."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import diffaccel
from conftest import requires_weights
from diffaccel import methods
from diffaccel.adapters import find_denoiser
from diffaccel.calibration.reference import CalibrationRun, identity_plan
from diffaccel.errors import PlanError, SearchError
from diffaccel.search.coefficients import coefficient_fits, fit_coefficients, record_reference
from diffaccel.solvers import SolverSpec
from diffaccel.solvers.spec import basis_size
from diffaccel.zoo.weights import load_pipeline
from stock_pipelines import build as build_case
from test_engine import call, make_pipes, untouched


@pytest.fixture(scope="module")
def pipes():
    return make_pipes()


def rows(steps: int, value: float = 0.0) -> tuple[tuple[float, ...], ...]:
    return tuple((value,) * basis_size(i) for i in range(steps))


def with_solver(pipe, **spec):
    return identity_plan(pipe.denoiser).model_copy(update={"solver": SolverSpec(**spec)})


@pytest.mark.parametrize("name", ["ddim", "dpm++2", "unipc", "evodiff"])
def test_zero_coefficients_reproduce_the_solver_exactly_and_others_change_it(pipes, name):
    pipe = pipes[0]
    scheduler = pipe.scheduler
    with diffaccel.accelerate(pipe, with_solver(pipe, name=name, steps=4)):
        plain = call(pipe)
    with diffaccel.accelerate(pipe, with_solver(pipe, name=name, steps=4, coefficients=rows(4))):
        assert torch.equal(call(pipe), plain)
    with diffaccel.accelerate(pipe, with_solver(pipe, name=name, steps=4, coefficients=rows(4, 0.01))) as run:
        changed = call(pipe)
    assert run.stats.steps == 4 and torch.isfinite(changed).all() and not torch.equal(changed, plain)
    assert pipe.scheduler is scheduler and untouched(pipe.denoiser)


@pytest.mark.parametrize("name", ["unipc", "evodiff"])
def test_zero_coefficients_and_the_solvers_own_told_timesteps_keep_its_explicit_timesteps(pipes, name):
    """The wrappers (``Corrected``, ``ModelTime``) sit over a scheduler whose timesteps the plan
    places: with all-zero coefficients, and with the solver's timesteps told, a run at explicit
    timesteps is the run at those timesteps, not at the spacing's (a wrapper once took the placement)."""
    pipe = pipes[0]
    placed = (999, 850, 500, 200)
    with diffaccel.accelerate(pipe, with_solver(pipe, name=name, steps=4)):
        spaced = call(pipe)
    with diffaccel.accelerate(pipe, with_solver(pipe, name=name, steps=4, timesteps=placed)):
        plain = call(pipe)
    assert not torch.equal(plain, spaced)
    for extra in ({"coefficients": rows(4)}, {"model_timesteps": placed},
                  {"coefficients": rows(4), "model_timesteps": placed}):
        with diffaccel.accelerate(pipe, with_solver(pipe, name=name, steps=4, timesteps=placed, **extra)):
            assert torch.equal(call(pipe), plain), extra


def test_bad_coefficients_are_refused_with_what_to_fix():
    with pytest.raises(ValueError, match="one row per step"):
        SolverSpec(name="unipc", steps=3, coefficients=rows(2))
    with pytest.raises(ValueError, match=r"\[2, 3, 4\]"):
        SolverSpec(name="unipc", steps=3, coefficients=((0.0,), (0.0, 0.0, 0.0), (0.0,) * 4))
    with pytest.raises(ValueError, match="finite"):
        SolverSpec(name="unipc", steps=2, coefficients=((float("nan"), 0.0), (0.0,) * 3))
    for other in ({"name": "euler"}, {"name": "ddim", "start": 0.5}):
        with pytest.raises(ValueError, match="variance-preserving"):
            SolverSpec(steps=2, coefficients=rows(2), **other)
    plan = SolverSpec(name="unipc", steps=5, coefficients=rows(5, 0.5))
    assert SolverSpec.model_validate_json(plan.model_dump_json()) == plan and "fitted coefficients" in plan.label


def test_the_last_steps_fit_brings_a_stock_pipelines_run_closer_to_its_reference():
    """On diffusers' StableDiffusionPipeline with its PNDM scheduler (repeated first timestep),
    tiny and random: least squares with zero weights feasible can only bring the final latents
    closer to the reference run's; every step's fit runs and gives a plan that applies."""
    pipe, kwargs = build_case("sd-pndm")
    scheduler = pipe.scheduler

    def calibrate(p):
        return p(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").images

    reference = record_reference(pipe, calibrate)
    assert pipe.scheduler is scheduler and len(reference.calls) == 1
    target = reference.target(0, None)
    spec = SolverSpec(name="dpm++2", steps=3)

    def latent_error(solver: SolverSpec, plan=None) -> float:
        plan = plan or identity_plan(pipe.unet)
        with diffaccel.accelerate(pipe, plan.model_copy(update={"solver": solver})):
            return float(((calibrate(pipe) - target) ** 2).mean())

    last = fit_coefficients(pipe, calibrate, spec, reference, trajectory=False)
    assert last.coefficients[:2] == rows(2) and any(last.coefficients[2])
    assert latent_error(last) < latent_error(spec)
    every = fit_coefficients(pipe, calibrate, spec, reference)
    assert [len(r) for r in every.coefficients] == [2, 3, 4] and all(any(r) for r in every.coefficients)
    assert torch.isfinite(torch.tensor(latent_error(every))) and pipe.scheduler is scheduler
    assert fit_coefficients(pipe, calibrate, spec, reference, deadline=0.0) is None
    cached = methods.fora(pipe, 3, interval=2)  # refitted under reuse: the same relation holds
    refit = fit_coefficients(pipe, calibrate, spec, reference, trajectory=False, plan=cached)
    assert refit.coefficients != last.coefficients and latent_error(refit, cached) < latent_error(spec, cached)
    assert pipe.scheduler is scheduler and untouched(pipe.unet)


@pytest.mark.parametrize("case", ["sd3", "flux"])
def test_coefficients_fit_on_a_flow_matching_pipeline(case):
    """SD3 and Flux (tiny, random; Flux with its resolution-dependent shift, set through sigmas=): the
    reference is recorded on the flow path (clean sample x - sigma v), zero coefficients reproduce the
    flow solver exactly, and the last step's fit brings the final latents closer to the reference."""
    pipe, kwargs = build_case(case)
    if case == "flux":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    scheduler, denoiser = pipe.scheduler, find_denoiser(pipe)[0]

    def calibrate(p):
        return p(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").images

    reference = record_reference(pipe, calibrate)
    target = reference.target(0, None)
    spec = SolverSpec(name="unipc", steps=3)

    def latents(solver: SolverSpec) -> torch.Tensor:
        with diffaccel.accelerate(pipe, identity_plan(denoiser).model_copy(update={"solver": solver})):
            return calibrate(pipe)

    plain = latents(spec)
    assert torch.equal(latents(spec.model_copy(update={"coefficients": rows(3)})), plain)
    last = fit_coefficients(pipe, calibrate, spec, reference, trajectory=False)
    assert any(last.coefficients[2]) and ((latents(last) - target) ** 2).mean() < ((plain - target) ** 2).mean()
    every = fit_coefficients(pipe, calibrate, spec, reference)
    assert all(any(r) for r in every.coefficients) and torch.isfinite(latents(every)).all()
    assert pipe.scheduler is scheduler and untouched(denoiser)


def test_coefficients_need_a_variance_preserving_reference_and_solver(pipes):
    pipe, kwargs = build_case("sd-euler-ancestral")
    with pytest.raises(SearchError, match="variance-preserving"):
        record_reference(pipe, lambda p: p(**kwargs, output_type="latent"))
    calib_pipe = pipes[0]
    reference = record_reference(calib_pipe, lambda p: call(p, steps=5))
    with pytest.raises(SearchError, match="not euler"):
        fit_coefficients(calib_pipe, lambda p: call(p, steps=5), SolverSpec(name="euler", steps=3), reference)
    with pytest.raises(PlanError):
        diffaccel.accelerate(calib_pipe.denoiser, with_solver(calib_pipe, name="unipc", steps=2,
                                                              coefficients=rows(2))).__enter__()


@requires_weights
def test_fitted_coefficients_carry_over_to_held_out_seeds_on_the_shipped_unet():
    """The fit's weights are a few scalars per step: fitted on 12 calibration images they lift a
    5-step UniPC run on other seeds (measured: +2.8 dB on 48 held-out images from 24)."""
    pipe = load_pipeline("unet")
    calibrate = pipe.workload_calls(per_class=2)
    held = CalibrationRun(pipe, pipe.workload_calls(per_class=2, calibration=False, seed=31337))
    spec = SolverSpec(name="unipc", steps=5)
    fits = {which: s for s, which in coefficient_fits(pipe, calibrate, spec, record_reference(pipe, calibrate))}
    plain = held.score(with_solver(pipe, name="unipc", steps=5)).psnr
    fitted = held.score(identity_plan(pipe.denoiser).model_copy(update={"solver": fits["every step"]})).psnr
    assert set(fits) == {"every step", "the last step"} and fitted > plain + 1.0

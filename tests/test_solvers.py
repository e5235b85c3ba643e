"""Samplers as part of a plan: the solver section, EVODiff, the informed start, the joint search and
budgets that bound the tail."""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FluxImg2ImgPipeline,
    IPNDMScheduler,
    UniPCMultistepScheduler,
)

import diffaccel
from diffaccel import methods
from diffaccel.adapters import find_denoiser
from diffaccel.calibration.record import activation_ranges
from diffaccel.calibration.reference import CalibrationRun, identity_plan
from diffaccel.calibration.workload import as_workload
from diffaccel.errors import BudgetError, PlanError, SearchError
from diffaccel.plan import Plan
from diffaccel.quant.spec import QuantSpec
from diffaccel.search import joint as joint_module
from diffaccel.search import parse_budget, search
from diffaccel.search.candidates import Candidate
from diffaccel.search.joint import JointSearch, _gap, _headroom_for
from diffaccel.search.model_timesteps import SHIFTS, fit_model_timesteps
from diffaccel.search.timesteps import FAMILY, STALL_PER_STEP, fit_timesteps, next_fit_count, power_schedule, resampled
from diffaccel.search.validation import FINAL_SHARE, Validator, plan_getter, validation_seconds
from diffaccel.solvers import SolverSpec
from diffaccel.solvers.corrected import Corrected
from diffaccel.solvers.evodiff import EVODiffScheduler
from diffaccel.solvers.model_time import ModelTime
from diffaccel.solvers.schedulers import place_timesteps, solver_scheduler
from diffaccel.zoo.pipeline import shapes_workload
from stock_pipelines import build as build_case
from test_engine import call, make_pipes, untouched


@pytest.fixture(scope="module")
def pipes():
    return make_pipes()


def with_solver(pipe, **spec) -> Plan:
    return identity_plan(pipe.denoiser).model_copy(update={"solver": SolverSpec(**spec)})


@pytest.mark.parametrize("name", ["ddim", "dpm++2", "dpm++3", "unipc", "evodiff", "euler"])
def test_a_solver_plan_runs_its_sampler_at_its_steps_and_restores_the_scheduler(pipes, name):
    pipe = pipes[0]
    scheduler = pipe.scheduler
    base = call(pipe, steps=6)
    with diffaccel.accelerate(pipe, with_solver(pipe, name=name, steps=4)) as run:
        out = call(pipe, steps=6)  # the pipeline asks for 6 steps; the plan runs 4
        assert type(pipe.scheduler).__name__ != type(scheduler).__name__ or name == "ddim"
    assert run.stats.steps == 4 and torch.isfinite(out).all() and not torch.equal(out, base)
    assert pipe.scheduler is scheduler and untouched(pipe.denoiser) and torch.equal(call(pipe, steps=6), base)


def _gaussian_error(scheduler, steps: int, kind: str) -> float:
    """Relative error of a run on Gaussian data, whose exact probability-flow trajectory is known,
    over timesteps evenly spaced in log-SNR (where a solver's order shows as steps double)."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 4, 6, 6, dtype=torch.float64, generator=gen)
    scale = torch.rand(1, 4, 1, 1, dtype=torch.float64, generator=gen) * 0.9 + 0.1
    bars = scheduler.alphas_cumprod.double()
    lam = 0.5 * torch.log(bars / (1 - bars))
    timesteps = tuple(int((lam - v).abs().argmin()) for v in torch.linspace(lam[999], lam[20], steps))
    scheduler.set_timesteps(steps)
    place_timesteps(scheduler, timesteps)

    def standard(t: int) -> tuple[float, torch.Tensor]:
        a = float(bars[t])
        return a ** 0.5, (a * scale ** 2 + 1 - a).sqrt()

    def clean(x: torch.Tensor, t: int) -> torch.Tensor:
        alpha, spread = standard(t)
        return mean + alpha * scale ** 2 / spread ** 2 * (x - alpha * mean)

    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=gen)
    alpha, spread = standard(timesteps[0])
    z = (x - alpha * mean) / spread
    alpha, spread = standard(timesteps[-1])
    exact = clean(alpha * mean + spread * z, timesteps[-1])  # the last step lands on the clean estimate
    for t in timesteps:
        alpha, sigma = float(bars[t]) ** 0.5, float(1 - bars[t]) ** 0.5
        m = clean(x, t)
        noise = (x - alpha * m) / sigma
        out = {"epsilon": noise, "v_prediction": alpha * noise - sigma * m, "sample": m}[kind]
        x = scheduler.step(out, t, x).prev_sample
    return float((x - exact).norm() / exact.norm())


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_evodiff_converges_at_second_order_whatever_the_model_predicts(kind):
    """Its variance-chosen weights only blend estimates of the same slope: doubling the steps divides
    the error by about four (a first-order solver: two), and it beats the first-order step."""
    errors = [_gaussian_error(EVODiffScheduler(prediction_type=kind), n, kind) for n in (10, 20, 40, 80)]
    assert all(before / after > 3.0 for before, after in zip(errors[1:], errors[2:])), errors
    first_order = _gaussian_error(DPMSolverMultistepScheduler(prediction_type=kind, solver_order=1), 20, kind)
    assert errors[1] < first_order / 5, (errors, first_order)


def test_evodiff_runs_from_zero_terminal_snr():
    """A zero-terminal-SNR schedule (v-prediction) starts at alpha 0: no division by zero."""
    scheduler = EVODiffScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                 timestep_spacing="trailing")
    scheduler.set_timesteps(6)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        x = scheduler.step(-0.5 * x, t, x).prev_sample
    assert torch.isfinite(x).all()


def test_the_same_sampler_as_the_pipeline_reproduces_it_and_caching_composes(pipes):
    pipe = pipes[1]
    base = call(pipe, steps=5)
    with diffaccel.accelerate(pipe, with_solver(pipe, name="ddim", steps=5)):
        assert torch.equal(call(pipe, steps=50), base)
    plan = methods.deepcache(pipe, 5, interval=2).model_copy(update={"solver": SolverSpec(name="dpm++2", steps=5)})
    with diffaccel.accelerate(pipe, plan) as run:
        assert torch.isfinite(call(pipe, steps=50)).all()
    assert run.stats.macs < run.stats.full_macs and run.stats.steps == 5


def test_a_solver_keeps_the_pipelines_own_settings_and_passes_eta_through_its_wrappers():
    """A stock DiT pipeline's DDIM clips its samples (the default it was saved with): the plan's DDIM
    at the same steps reproduces it; eta reaches DDIM through fitted coefficients and an informed start."""
    pipe, call_args = build_case("dit")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # clip_sample: the default, True

    def run(eta: float | None = None):
        extra = {} if eta is None else {"eta": eta}
        return pipe(**call_args, generator=torch.Generator().manual_seed(0), output_type="np", **extra).images

    base = run()
    def stock_solver(stock, **spec) -> Plan:
        return identity_plan(find_denoiser(stock)[0]).model_copy(update={"solver": SolverSpec(**spec)})

    with diffaccel.accelerate(pipe, stock_solver(pipe, name="ddim", steps=call_args["num_inference_steps"])):
        assert (run() == base).all()
    sd, sd_call = build_case("sd-ddim-eta")
    for spec in ({"coefficients": [[0.0] * n for n in (2, 3, 4, 4)]}, {"start": 0.5}):
        plan = stock_solver(sd, name="ddim", steps=4, **spec)
        outputs = []
        for eta in (0.0, 1.0):
            with diffaccel.accelerate(sd, plan):
                outputs.append(sd(**{**sd_call, "eta": eta}, generator=torch.Generator().manual_seed(0),
                                  output_type="pt").images)
        assert not torch.equal(*outputs), spec  # eta=1 adds noise: it was silently dropped


def test_an_informed_start_costs_one_evaluation_more_and_is_deterministic(pipes):
    pipe = pipes[0]
    plan = with_solver(pipe, name="dpm++2", steps=4, start=0.6)
    with diffaccel.accelerate(pipe, plan) as run:
        first, again = call(pipe), call(pipe)
    assert run.stats.steps == 5 and torch.equal(first, again) and torch.isfinite(first).all()
    with pytest.raises(ValueError, match="variance-preserving"):
        with_solver(pipe, name="euler", steps=4, start=0.6)


def _flow_latents(pipe, kwargs, steps=None):
    kwargs = {**kwargs, **({"num_inference_steps": steps} if steps else {})}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(1), output_type="latent").images


FLOW_SCHEDULERS = {"sd3": {"shift": 3.0},  # SD3's static shift; Flux's shift from the image size (mu)
                   "flux": {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "shift": 3.0}}


@pytest.mark.parametrize("case", ["sd3", "flux"])
def test_on_a_flow_matching_pipeline_a_solver_plan_runs_on_the_pipelines_own_noise_levels(case):
    """SD3 calls ``set_timesteps(n)``, Flux ``set_timesteps(sigmas=linspace(1, 1/n, n), mu=...)``:
    either way the plan's steps run. ``ddim`` and ``euler`` are the pipeline's own Euler at the plan's
    steps, exactly; the multistep solvers run on diffusers' flow grid shifted as the pipeline shifts
    it, so at 12 steps they land nearer a 100-step run than Euler does (a misplaced schedule would
    not); the pipeline's scheduler is restored; custom sigmas from the caller are refused."""
    pipe, kwargs = build_case(case)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULERS[case])
    scheduler, denoiser = pipe.scheduler, find_denoiser(pipe)[0]
    own = {n: _flow_latents(pipe, kwargs, n) for n in (4, 12, 100)}
    errors = {}
    for name in ("ddim", "euler", "dpm++1", "dpm++2", "dpm++3", "unipc"):
        for steps in (4, 12):
            plan = identity_plan(denoiser).model_copy(update={"solver": SolverSpec(name=name, steps=steps)})
            with diffaccel.accelerate(pipe, plan) as run:
                out = _flow_latents(pipe, kwargs, 28)  # the pipeline asks for 28; the plan runs its steps
            assert run.stats.steps == steps and torch.isfinite(out).all() and pipe.scheduler is scheduler
            errors[name, steps] = (out - own[100]).pow(2).mean().item()
            if name in ("ddim", "euler"):
                assert torch.equal(out, own[steps])
    for name in ("dpm++2", "dpm++3", "unipc"):
        assert errors[name, 12] < errors["euler", 12], (name, errors)
    assert torch.equal(_flow_latents(pipe, kwargs, 4), own[4]) and untouched(denoiser)
    plan = identity_plan(denoiser).model_copy(update={"solver": SolverSpec(name="unipc", steps=4)})
    with pytest.raises(PlanError, match="without timesteps= and sigmas="):
        with diffaccel.accelerate(pipe, plan):
            _flow_latents(pipe, {**kwargs, "sigmas": [1.0, 0.8, 0.5, 0.2]}, 4)
    assert pipe.scheduler is scheduler and untouched(denoiser)


def test_a_pipeline_whose_own_sampler_is_a_flow_multistep_solver_gets_the_plans_solver():
    """A user's pipeline running diffusers' UniPC in its flow mode: ``unipc`` at its own step count
    reproduces the pipeline's run exactly, and ``euler`` runs Euler, not the pipeline's UniPC."""
    pipe, kwargs = build_case("user-pipeline")
    pipe.scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    denoiser = find_denoiser(pipe)[0]
    own = pipe(**{**kwargs, "num_inference_steps": 5}, generator=torch.Generator().manual_seed(1)).images
    outs = {}
    for name in ("unipc", "euler"):
        plan = identity_plan(denoiser).model_copy(update={"solver": SolverSpec(name=name, steps=5)})
        with diffaccel.accelerate(pipe, plan):
            assert type(pipe.scheduler.inner).__name__ == ("UniPCMultistepScheduler" if name == "unipc"
                                                           else "FlowMatchEulerDiscreteScheduler")
            outs[name] = pipe(**{**kwargs, "num_inference_steps": 9}, generator=torch.Generator().manual_seed(1)).images
    assert torch.equal(outs["unipc"], own) and not torch.equal(outs["euler"], own)


def test_explicit_timesteps_on_a_flow_pipeline_name_its_noise_levels():
    """On Flux's default schedule (no shift) 4 steps run at timesteps 1000/750/500/250: Euler given
    them explicitly is the pipeline's own run; other timesteps are what the denoiser is told (the
    noise level times 1000), and past 1000 is refused."""
    pipe, kwargs = build_case("flux")
    denoiser = pipe.transformer
    own = _flow_latents(pipe, kwargs, 4)
    told = []
    hook = denoiser.register_forward_pre_hook(lambda m, a, kw: told.append(round(float(kw["timestep"][0]) * 1000)),
                                              with_kwargs=True)
    for name, steps in (("euler", (1000, 750, 500, 250)), ("unipc", (1000, 900, 600, 200)), ("dpm++2", (950, 500))):
        told.clear()
        plan = identity_plan(denoiser).model_copy(
            update={"solver": SolverSpec(name=name, steps=len(steps), timesteps=steps)})
        with diffaccel.accelerate(pipe, plan):
            out = _flow_latents(pipe, kwargs, 28)
        assert tuple(told) == steps and torch.isfinite(out).all()
        if name == "euler":
            assert torch.equal(out, own)
    hook.remove()
    plan = identity_plan(denoiser).model_copy(
        update={"solver": SolverSpec(name="unipc", steps=2, timesteps=(1200, 10))})
    with pytest.raises(PlanError, match="timesteps reach 1200; on this flow schedule they run from 0 to 1000"):
        with diffaccel.accelerate(pipe, plan):
            pass
    assert untouched(denoiser)


def test_a_flow_image_to_image_pipeline_runs_the_plans_solver_from_its_noised_image():
    """FluxImg2ImgPipeline at strength 0.5 noises the image to its start with the scheduler's
    ``scale_noise``, which diffusers' multistep solvers lack: the plan's solver provides it on the
    flow path (the pipeline's own Euler gives bitwise its own run), and runs the last 3 of 6 steps."""
    pipe, kwargs = build_case("flux")
    i2i = FluxImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    kwargs = {**kwargs, "prompt_embeds": kwargs["prompt_embeds"][:1],
              "pooled_prompt_embeds": kwargs["pooled_prompt_embeds"][:1], "num_inference_steps": 6}
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def run():
        return i2i(**kwargs, image=image, strength=0.5, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images

    own = run()
    for name in ("euler", "unipc", "dpm++2"):
        plan = identity_plan(pipe.transformer).model_copy(update={"solver": SolverSpec(name=name, steps=6)})
        with diffaccel.accelerate(i2i, plan) as executed:
            out = run()
        assert executed.stats.steps == 3 and torch.isfinite(out).all()
        assert torch.equal(out, own) == (name == "euler")


def test_a_flow_solver_takes_the_same_noise_levels_as_diffusers_own_flow_mode():
    """What a user gets from ``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3)`` on
    SD3 is what the plan's ``dpm++2`` runs on (the timesteps differ only by diffusers' rounding)."""
    pipe, kwargs = build_case("sd3")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                        solver_order=2, final_sigmas_type="zero")
    stock.set_timesteps(8)
    solver = solver_scheduler(SolverSpec(name="dpm++2", steps=8), pipe.scheduler)
    solver.set_timesteps(28)
    assert torch.allclose(solver.sigmas, stock.sigmas, atol=1e-6)
    assert torch.equal(solver.timesteps.long(), stock.timesteps)


def test_bad_solver_plans_are_refused_and_leave_everything_as_it_was(pipes):
    pipe = pipes[0]
    with pytest.raises(PlanError, match="solver dpm\\+\\+2 4 runs 4"):
        Plan.from_dict({**methods.fora(pipe, 6, 2).model_dump(), "solver": {"name": "dpm++2", "steps": 4}})
    with pytest.raises(PlanError, match="pass the pipeline"):
        diffaccel.enable(pipe.denoiser, with_solver(pipe, name="ddim", steps=4))
    flux, flux_call = build_case("flux")
    scheduler = flux.scheduler
    for spec, message in (({"name": "evodiff", "steps": 4}, "evodiff needs a noise-schedule .* use one of ddim, euler"),
                          ({"name": "unipc", "steps": 4, "spacing": "leading"}, "their timesteps and coefficients "
                                                                                "only; leave out a spacing"),
                          ({"name": "ddim", "steps": 4, "start": 0.5}, "leave out an informed start")):
        plan = identity_plan(flux.transformer).model_copy(update={"solver": SolverSpec(**spec)})
        with pytest.raises(PlanError, match=message):
            with diffaccel.accelerate(flux, plan):
                pass
    assert flux.scheduler is scheduler and untouched(pipe.denoiser) and untouched(flux.transformer)
    own = pipe.scheduler
    for spec, message in (({"name": "unipc", "steps": 1000}, "1000-step schedule, more than half"),
                          ({"name": "ddim", "steps": 10, "start": 0.001}, "10000-step schedule.*or start later"),
                          ({"name": "ddim", "steps": 6, "bottleneck": (2, 2, 2), "scale": 3},
                           "bottleneck scale 3 and the model.s patch size 2 need a latent size divisible by 6")):
        with pytest.raises(PlanError, match=message):
            with diffaccel.accelerate(pipe, with_solver(pipe, **spec)):
                call(pipe, steps=6)
        assert pipe.scheduler is own and untouched(pipe.denoiser)
    fora = methods.fora(pipe, 4, 2).model_copy(update={"solver": SolverSpec(name="unipc", steps=4)})
    with pytest.raises(PlanError, match="solver section runs unipc 4 whatever steps.*not resampled"):
        fora.resample(6)


def test_budgets_can_bound_the_tail():
    ssim = parse_budget("ssim>=0.9,psnr_p5>=24").raised(0.005)  # the tail stays in dB, with a dB margin
    assert ssim.threshold == pytest.approx(0.905) and ssim.tail == pytest.approx(24.5)
    assert parse_budget("ssim>=0.9,psnr_p5>=24").raised(0).tail == 24
    budget = parse_budget("psnr>=30,psnr_p5>=24")
    assert budget.threshold == 30 and budget.tail == 24 and budget.text == "psnr>=30,psnr_p5>=24"
    assert budget.accepts(31, 25) and not budget.accepts(31, 20) and not budget.accepts(29, 26)
    assert budget.raised(0.5).tail == 24.5
    for bad in ("psnr_p5>=24", "psnr>=30,ssim>=0.9", "psnr>=30,psnr_p5=24"):
        with pytest.raises(BudgetError):
            parse_budget(bad)


def test_joint_search_picks_sampler_and_caching_together_and_keeps_its_time(pipes, tmp_path):
    pipe = pipes[0]
    limit = 40.0
    started, lines = time.time(), []
    result = search(pipe, shapes_workload([0, 1], 10, per_class=1), budget="psnr>=15", strategy="joint",
                    time_limit=limit, heldout=shapes_workload([2], 10, per_class=1, calibration=False), pairs=1,
                    out=tmp_path, log=lines.append)
    spent = time.time() - started
    plan = result.plan
    assert spent < limit * 1.25 + 10  # the held-out check is reserved inside the limit (tiny runs vary)
    assert result.summary["heldout_psnr"] is not None and result.met
    assert plan.method in ("search-joint", "steps") or result.summary["chosen_is_handmade"]
    # key steps on the pipeline's own sampler are part of the space (profiled by the reference run)
    assert any("own sampler 10 + " in line for line in lines)
    with diffaccel.accelerate(pipe, Plan.load(tmp_path / "plan.json")) as run:
        assert torch.isfinite(call(pipe, steps=10)).all()
    assert run.stats.full_macs > 0


def test_joint_search_skips_plans_that_cannot_beat_the_cheapest_one_meeting_the_budget(pipes):
    calib = CalibrationRun(pipes[0], shapes_workload([0], 6, per_class=1))
    joint = JointSearch(calib, parse_budget("psnr>=30"), "macs", None, lambda _: None)
    plan = methods.fora(pipes[0].denoiser, 6, interval=2)
    cost = calib.fractions(plan)[0]
    assert 0 < cost < 1 and not joint._cannot_win(plan)  # nothing meets the budget yet
    joint.candidates = [Candidate(None, [], 29.0, 20.0, 0.9, cost / 2, cost / 2, "too poor")]
    assert not joint._cannot_win(plan)  # the cheaper candidate misses the budget
    joint.candidates.append(Candidate(None, [], 31.0, 25.0, 0.95, cost, cost, "as cheap, and good"))
    assert joint._cannot_win(plan)
    by_latency = JointSearch(calib, parse_budget("psnr>=30"), "latency", None, lambda _: None)
    by_latency.candidates = joint.candidates
    assert not by_latency._cannot_win(plan)  # measured latency against an estimate: never skipped on
    # with a validator, only a plan that also holds on fresh seeds bars dearer ones
    asked: list[str] = []
    joint.validator = SimpleNamespace(confirmed=lambda c: asked.append(c.source) or c.source != "as cheap, and good")
    assert not joint._cannot_win(plan) and asked == ["as cheap, and good"]  # the one that misses is never asked
    joint.candidates.append(Candidate(None, [], 30.5, 25.0, 0.95, cost * 0.9, cost, "confirmed"))
    assert joint._cannot_win(plan) and asked[-1] == "confirmed"


def test_validation_runs_during_the_joint_search_take_back_the_time_kept_for_the_validation(pipes):
    calib = CalibrationRun(pipes[0], shapes_workload([0], 6, per_class=1))
    validator = Validator(calib, parse_budget("psnr>=30"), plan_getter(None), lambda _: None)
    kept = validation_seconds(calib)
    joint = JointSearch(calib, parse_budget("psnr>=30"), "macs", 1000.0, lambda _: None, validator=validator)
    assert kept > 0 and joint.deadline == 1000.0 and joint.late()  # nothing validated yet
    validator.seconds = kept / 2
    assert joint.deadline == pytest.approx(1000.0 + kept / 2)
    validator.seconds = kept * 10  # only the time kept back for the validation is given back, less the final's share
    assert joint.deadline == pytest.approx(1000.0 + kept - FINAL_SHARE * calib.seconds)
    assert joint.deadline < 1000.0 + kept
    unlimited = JointSearch(calib, parse_budget("psnr>=30"), "macs", None, lambda _: None, validator=validator)
    assert unlimited.deadline is None and not unlimited.late()


def test_the_joint_search_tries_every_key_count_between_the_last_miss_and_all_steps(pipes):
    """A few-step sampler that meets the budget but misses it with 6 of its 8 steps full: 7 full
    steps, between the two, is tried at each unit level (the fractions alone would skip it)."""
    lines: list[str] = []
    calib = CalibrationRun(pipes[0], shapes_workload([0], 8, per_class=1))
    joint = JointSearch(calib, parse_budget("psnr>=200"), "macs", None, lines.append)
    joint.cached(SolverSpec(name="unipc", steps=8))
    tried = [line for line in lines if "unipc 8 + " in line]
    assert any(" keys 6:" in line for line in tried) and any(" keys 7:" in line for line in tried)
    # from half the steps full (4), a miss by more than 2 dB ends the descent: then up, 5 and 6
    assert all(" keys 3:" not in line and " keys 2:" not in line for line in tried)


def test_the_joint_search_quantizes_its_best_plans_at_the_measured_speed_of_the_quantized_model(pipes, tmp_path):
    work = shapes_workload([0], 6, per_class=1)
    ranges = activation_ranges(pipes[0], work, progress=False).save(tmp_path / "ranges.safetensors")
    spec = QuantSpec(weight_bits=8, act_bits=8, calibration=str(ranges))
    joint = JointSearch(CalibrationRun(pipes[0], work), parse_budget("psnr>=1"), "latency", None, lambda _: None,
                        quant=spec)
    plain = joint.score(methods.fora(pipes[0].denoiser, 6, interval=2), "fora 2")
    joint.quantized()
    quantized = [c for c in joint.candidates if c.plan.quant is not None]
    assert len(quantized) == 1 and joint.quant_speed > 0
    assert quantized[0].plan.schedule == plain.plan.schedule and quantized[0].mac_fraction == plain.mac_fraction
    assert quantized[0].latency_fraction == pytest.approx(plain.latency_fraction * joint.quant_speed)
    assert quantized[0].bops_fraction == pytest.approx(plain.mac_fraction / 4)  # W8: a quarter of fp32 per MAC
    # errors add as squared differences: a 36 dB quantization error costs a 30 dB plan about 1.3 dB
    assert 1.0 < _headroom_for(30, 36) < 1.5 and _headroom_for(30, 29) == 0.0
    with pytest.raises(SearchError, match="objective bops"):  # a simulated quantization, by MACs
        search(pipes[0], work, strategy="joint", quant=spec, log=lambda _: None)
    # no time left: the searched plans stay unquantized beside the quantized hand-made ones, and the log says so
    lines: list[str] = []
    late = JointSearch(joint.calib, parse_budget("psnr>=1"), "bops", time.time(), lines.append, quant=spec)
    late.quantized()
    assert late.quant_speed is None and "warning" in lines[-1] and "stay unquantized" in lines[-1]


@pytest.mark.parametrize("offset,expected", [(25, [10, 8, 6, 4, 3, 1, 5]), (15, [10, 13, 16, 14, 15]),
                                             (29, [10, 8, 6, 4, 3, 1])])
def test_the_joint_search_tries_half_the_steps_full_first_and_the_dear_plans_only_when_needed(pipes, monkeypatch,
                                                                                               offset, expected):
    """PSNR = offset + full steps, budget 30 at 20 steps: where 10 full steps meet it, 16 and 13 (each
    nearly a full run) are never scored; where 10 miss, more until one meets, then the bisection. While
    the budget holds the descent goes down to one key step (it had stopped at two, where the dp strategy
    found a one-key plan twice as fast)."""
    calib = CalibrationRun(pipes[0], shapes_workload([0], 20, per_class=1))
    joint = JointSearch(calib, parse_budget("psnr>=30"), "macs", None, lambda _: None)
    base = identity_plan(pipes[0].denoiser)
    tried = []

    def fake_keys(profile, level, keys, spec, label):
        tried.append((level.name, keys))
        psnr = offset + keys
        return Candidate(None, [], psnr, psnr, 0.9, keys / 20, keys / 20, label, 0, {}, None, psnr, base)

    monkeypatch.setattr(joint, "_keys", fake_keys)
    joint.cached(None)
    first = tried[0][0]
    assert [keys for name, keys in tried if name == first] == expected


def test_joint_search_bisects_the_key_budget_between_a_pass_and_a_miss():
    assert _gap({11: True, 8: False}) == (8, 11)  # 9 and 10 untried: bisect
    assert _gap({11: True, 9: True, 8: False}) is None  # nothing left between
    assert _gap({11: True, 10: False}) is None
    assert _gap({40: True, 32: True}) is None and _gap({5: False}) is None  # no miss below a pass
    assert _gap({25: True, 20: False, 15: True, 11: False}) == (11, 15)  # below the fewest that met


def test_bottleneck_sampling_runs_the_middle_steps_smaller_on_a_dit_and_is_refused_on_a_unet(pipes):
    dit, unet = pipes
    spec = SolverSpec(name="ddim", steps=6, bottleneck=(2, 2, 2))
    with diffaccel.accelerate(dit, with_solver(dit, **spec.model_dump())) as run:
        out = call(dit)
    plain = identity_plan(dit.denoiser).model_copy(update={"solver": SolverSpec(name="ddim", steps=6)})
    with diffaccel.accelerate(dit, plain) as full:
        call(dit)
    assert out.shape == call(dit).shape and torch.isfinite(out).all()
    assert run.stats.macs < 0.75 * full.stats.macs and run.stats.steps == 6
    with pytest.raises(PlanError, match="bottleneck"):
        with diffaccel.accelerate(unet, with_solver(unet, **spec.model_dump())):
            call(unet)
    assert untouched(unet.denoiser) and untouched(dit.denoiser)
    with pytest.raises(ValueError, match="sum to"):
        SolverSpec(name="ddim", steps=6, bottleneck=(2, 2, 3))


def test_bottleneck_sizes_the_model_cannot_run_at_are_refused_at_the_first_step():
    """The reduced latent must be a whole number of the transformer's patches: a 12x12 latent at
    1/4 is 3x3, which a patch-2 DiT cannot embed (diffusers would fail mid-run with a shape error)."""
    pipe, call_args = build_case("dit")
    torch.manual_seed(0)
    model = pipe.transformer = type(pipe.transformer).from_config({**pipe.transformer.config, "sample_size": 12})
    plan = identity_plan(model).model_copy(update={"solver": SolverSpec(name="ddim", steps=6, bottleneck=(2, 2, 2),
                                                                        scale=4)})
    assert model.config.patch_size == 2  # 12 / 4 = 3 rows: no whole number of patches
    with pytest.raises(PlanError, match="patch size 2 need a latent size divisible by 8"):
        with diffaccel.accelerate(pipe, plan) as run:
            pipe(**call_args, generator=torch.Generator().manual_seed(0), output_type="np")
    assert run.stats.steps <= 1 and untouched(model)


def test_step_counts_that_diffusers_rounds_to_an_extra_negative_timestep_are_refused_with_counts_that_work():
    """At 61 steps diffusers' trailing spacing gives 62 timesteps, the last -1 (its own run at 61 steps
    returns noise); an informed start whose schedule lands on such a count is refused alike."""
    pipe, _ = build_case("dit")
    trailing = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    trailing.set_timesteps(61)
    assert len(trailing.timesteps) == 62 and int(trailing.timesteps[-1]) == -1  # the quirk itself
    for spec, shown in ((SolverSpec(name="ddim", steps=61), "61 steps would"),
                        (SolverSpec(name="unipc", steps=60, start=0.99), "60 steps from 0.99 (a 61-step schedule)")):
        with pytest.raises(PlanError, match=rf"gives 62 timesteps, the last -1 .*{re.escape(shown)}.* 60 or 62"):
            solver_scheduler(spec, trailing)
    assert solver_scheduler(SolverSpec(name="ddim", steps=62), trailing) is not None


@pytest.mark.parametrize("name", ["euler", "dpm++2", "unipc", "evodiff"])
def test_explicit_timesteps_equal_to_the_solvers_own_reproduce_its_run_and_others_change_it(pipes, name):
    pipe = pipes[0]
    scheduler = solver_scheduler(SolverSpec(name=name, steps=5), pipe.scheduler)
    scheduler.set_timesteps(5)
    own = tuple(int(t) for t in scheduler.timesteps)
    with diffaccel.accelerate(pipe, with_solver(pipe, name=name, steps=5)):
        base = call(pipe)
    with diffaccel.accelerate(pipe, with_solver(pipe, name=name, steps=5, timesteps=own)):
        assert torch.equal(call(pipe), base)
    moved = (own[0], *(t - 40 for t in own[1:]))
    with diffaccel.accelerate(pipe, with_solver(pipe, name=name, steps=5, timesteps=moved)) as run:
        out = call(pipe)
    assert run.stats.steps == 5 and torch.isfinite(out).all() and not torch.equal(out, base)


def test_bad_explicit_timesteps_are_refused_with_what_to_fix(pipes):
    for bad in ({"name": "unipc", "steps": 3, "timesteps": (900, 500)}, {"name": "unipc", "steps": 3,
                "timesteps": (900, 900, 100)}, {"name": "ddim", "steps": 2, "timesteps": (900, 100)},
                {"name": "unipc", "steps": 2, "timesteps": (900, 100), "spacing": "trailing"}):
        with pytest.raises(ValueError, match="timesteps"):
            SolverSpec(**bad)
    pipe = pipes[0]
    with pytest.raises(PlanError, match="reach 5000"):
        with diffaccel.accelerate(pipe, with_solver(pipe, name="unipc", steps=2, timesteps=(5000, 10))):
            call(pipe)
    assert untouched(pipe.denoiser)


def test_solver_settings_that_would_run_wrong_are_refused():
    """``steps=True`` is not one step; a start that skips no step would evaluate the first timestep
    twice; one step under leading spacing would evaluate pure noise at t=1 and return it."""
    for bad in ({"steps": True}, {"steps": 5, "start": True}, {"steps": 20, "bottleneck": [True, 18, True]}):
        with pytest.raises(ValueError, match="true/false"):
            SolverSpec(**bad)
    with pytest.raises(ValueError, match="skips no step.*at most 0.833"):
        SolverSpec(steps=5, start=0.95)
    assert SolverSpec(steps=5, start=0.8).evaluations == 6
    with pytest.raises(ValueError, match="not euler"):
        SolverSpec(name="euler", steps=4, start=0.5)  # refused with the plan file, not when it runs
    with pytest.raises(ValueError, match="within"):
        SolverSpec(name="unipc", steps=1, coefficients=[[1e308, 0.0]])
    sd, _ = build_case("sd-pndm")  # leading spacing
    for name, spacing in (("ddim", None), ("ddim", "linspace"), ("euler", "linspace"), ("unipc", None)):
        with pytest.raises(PlanError, match=f"one step under {spacing or 'leading'} spacing .* timestep"):
            solver_scheduler(SolverSpec(name=name, steps=1, spacing=spacing), sd.scheduler)
    for name in ("ddim", "unipc"):
        for spacing in ("trailing", "linspace" if name == "unipc" else "trailing"):  # unipc's linspace ends at 999
            one = solver_scheduler(SolverSpec(name=name, steps=1, spacing=spacing), sd.scheduler)
            one.set_timesteps(1)
            assert one.timesteps.tolist() == [999]
    # IPNDM carries trained_betas=None: the solver had run on diffusers' default betas; FlowMatchHeun had
    # been told it lacks betas, where it is a flow scheduler the flow solvers do not read
    with pytest.raises(PlanError, match="IPNDMScheduler has none"):
        solver_scheduler(SolverSpec(name="dpm++2", steps=4), IPNDMScheduler())
    with pytest.raises(PlanError, match="FlowMatchHeunDiscreteScheduler is another flow-matching scheduler"):
        solver_scheduler(SolverSpec(name="unipc", steps=4), FlowMatchHeunDiscreteScheduler(shift=3.0))


def test_a_solver_plan_refuses_call_arguments_it_would_override_or_the_pipeline_would_misread():
    """The plan's solver sets the steps and timesteps: a ``timesteps=`` of the call is refused, not
    dropped; an image-to-image pipeline, which takes the last ``strength`` of its own step count,
    runs only at the plan's count (and then as the stock sampler does); a one-step call (PixArt's
    one-step path) only with a one-step plan."""
    from diffusers import StableDiffusionImg2ImgPipeline

    sd, sd_call = build_case("sd-pndm")
    plan = identity_plan(sd.unet).model_copy(update={"solver": SolverSpec(name="ddim", steps=4, spacing="trailing")})
    with pytest.raises(PlanError, match="without timesteps="):
        with diffaccel.accelerate(sd, plan):
            sd(**{k: v for k, v in sd_call.items() if k != "num_inference_steps"}, timesteps=[999, 500, 100],
               output_type="pt")
    i2i = StableDiffusionImg2ImgPipeline(**sd.components)
    i2i.set_progress_bar_config(disable=True)

    def run(steps: int):
        return i2i(prompt="a red circle", image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
                   strength=0.5, num_inference_steps=steps, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images

    for steps in (3, 50):
        with pytest.raises(PlanError, match="num_inference_steps=4"):
            with diffaccel.accelerate(i2i, plan):
                run(steps)
    with diffaccel.accelerate(i2i, plan) as accelerated:
        out = run(4)
    assert accelerated.stats.steps == 2  # half of the plan's 4 steps, as strength 0.5 asks
    told = plan.model_copy(update={"solver": plan.solver.model_copy(update={"model_timesteps": (999, 749, 499, 249)})})
    with diffaccel.accelerate(i2i, told):  # told timesteps map back to the solver's by value: the tail works too
        assert torch.equal(run(4), out)
    stock = i2i.scheduler
    i2i.scheduler = DDIMScheduler.from_config(stock.config, timestep_spacing="trailing", clip_sample=False)
    try:
        assert torch.equal(run(4), out)
    finally:
        i2i.scheduler = stock
    assert untouched(i2i.unet)
    pixart, pixart_call = build_case("pixart-alpha")
    with pytest.raises(PlanError, match="num_inference_steps=1 .* num_inference_steps=4"):
        with diffaccel.accelerate(pixart, identity_plan(pixart.transformer).model_copy(
                update={"solver": SolverSpec(name="unipc", steps=4)})):
            pixart(**{**pixart_call, "num_inference_steps": 1}, output_type="pt")
    assert untouched(pixart.transformer)


@pytest.mark.parametrize("name", ["ddim", "unipc", "evodiff"])
def test_told_timesteps_equal_to_the_solvers_own_reproduce_its_run_and_others_change_it(name):
    """On diffusers' StableDiffusionPipeline (PNDM, tiny, random): the timesteps the denoiser is told
    (``model_timesteps``) replace what the pipeline passes it while the solver steps at its own; told
    timesteps equal to its own reproduce the plain run exactly, with fitted coefficients too (they
    read the solver's timesteps, not the told ones); other told timesteps change the images."""
    pipe, kwargs = build_case("sd-pndm")
    scheduler, unet = pipe.scheduler, pipe.unet
    spec = SolverSpec(name=name, steps=4, coefficients=tuple((0.01,) * n for n in (2, 3, 4, 4)))
    built = solver_scheduler(spec, scheduler)
    built.set_timesteps(4)
    own = tuple(int(t) for t in built.timesteps)
    seen = []
    handle = unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1].reshape(-1)[0])))
    try:
        runs = {}
        for key, told in (("plain", None), ("own", own), ("told", (own[0] - 16, *own[1:-1], own[-1] + 4))):
            plan = identity_plan(unet).model_copy(update={"solver": spec.model_copy(update={"model_timesteps": told})})
            seen.clear()
            with diffaccel.accelerate(pipe, plan) as run:
                runs[key] = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
            assert run.stats.steps == 4 and sorted(set(seen), reverse=True) == list(told or own)
    finally:
        handle.remove()
    assert torch.equal(runs["own"], runs["plain"]) and not torch.equal(runs["told"], runs["plain"])
    assert torch.isfinite(runs["told"]).all() and pipe.scheduler is scheduler and untouched(unet)
    told = spec.model_copy(update={"model_timesteps": (990, 700, 400, 100)})
    wrapped = solver_scheduler(told, scheduler)  # outermost: the corrections inside see the solver's timesteps
    assert isinstance(wrapped, ModelTime) and isinstance(wrapped.inner, Corrected)
    assert SolverSpec.model_validate_json(told.model_dump_json()) == told and "model timesteps 990/700" in told.label


def test_bad_told_timesteps_are_refused_with_what_to_fix(pipes):
    for bad, message in (({"steps": 3, "model_timesteps": (900, 500)}, "3 distinct decreasing"),
                         ({"steps": 2, "model_timesteps": (100, 900)}, "decreasing"),
                         ({"steps": 2, "model_timesteps": (900, 100), "start": 0.5}, "informed start"),
                         ({"steps": 2, "model_timesteps": [True, False]}, "true/false")):
        with pytest.raises(ValueError, match=message):
            SolverSpec(name="ddim", **bad)
    pipe = pipes[0]
    with pytest.raises(PlanError, match="reach 5000"):
        with diffaccel.accelerate(pipe, with_solver(pipe, name="unipc", steps=2, model_timesteps=(5000, 10))):
            call(pipe)
    assert untouched(pipe.denoiser)


def test_a_told_timestep_fit_moves_each_step_toward_what_scores_best_coarse_to_fine():
    own, target = (999, 749, 499, 249), (987, 721, 503, 249)
    spec = SolverSpec(name="unipc", steps=4)
    runs = []

    def objective(candidate: SolverSpec) -> float:
        runs.append(candidate.model_timesteps)
        return -sum(abs(a - b) for a, b in zip(candidate.model_timesteps, target))

    fit = fit_model_timesteps(spec, own, objective, None, 1000)
    assert runs[0] == own and fit.evaluations == len(runs) <= 1 + 2 * 4 * len(SHIFTS)
    assert all(abs(a - b) <= 2 for a, b in zip(fit.spec.model_timesteps, target))  # moves of 16, 8, 4: within 2
    assert fit.quality == objective(fit.spec) > fit.start_quality and fit.spec.timesteps is None
    assert all(t[0] < 1000 for t in runs)  # never past the noise schedule: 999 + 16 is not tried
    assert fit_model_timesteps(spec, own, lambda s: 0.0, None, 1000).spec == spec  # nothing gained: the solver's own
    runs.clear()
    late = fit_model_timesteps(spec, own, objective, time.time() - 1, 1000)
    assert runs == [] and late.spec == spec and late.evaluations == 0


def test_a_timestep_fit_moves_the_steps_toward_what_scores_best_within_its_cap_and_deadline():
    target = (999, 900, 700, 300)
    spec = SolverSpec(name="unipc", steps=4)
    runs = []

    def objective(candidate: SolverSpec) -> float:
        runs.append(candidate.timesteps)
        return -sum((a - b) ** 2 for a, b in zip(candidate.timesteps, target)) ** 0.5

    own = (999, 749, 499, 249)
    fit = fit_timesteps(spec, own, objective, evaluations=60)
    assert runs[0] == own and len(set(runs)) == len(runs) == fit.evaluations <= 60
    assert fit.spec.timesteps[0] == 999 and list(fit.spec.timesteps) == sorted(fit.spec.timesteps, reverse=True)
    assert fit.quality == objective(fit.spec) > fit.start_quality + 200  # from 464 away to within ~260
    # a warm start (an earlier fit at another step count, resampled) is taken when it scores better
    assert resampled(own, 4) == own and resampled((999, 900, 700, 500, 300), 4) == (999, 850, 600, 350)
    warmed = fit_timesteps(spec, own, objective, evaluations=2, warm=target)
    assert warmed.spec.timesteps == target and warmed.quality == 0 and warmed.start_quality == fit.start_quality
    runs.clear()
    late = fit_timesteps(spec, own, objective, deadline=time.time() - 1)
    assert runs == [] and late.spec.timesteps == own and late.evaluations == 0


def test_a_timestep_fit_stops_when_its_runs_stop_gaining_and_goes_on_while_they_gain():
    """A fit whose last ``STALL_PER_STEP`` runs per free timestep raised the best by less than
    ``stall_gain`` stops there (the time goes to a restart or the next fit); one that keeps gaining
    runs to its cap, as does any fit without a ``stall_gain``."""
    spec, own = SolverSpec(name="unipc", steps=4), (999, 749, 499, 249)
    flat = fit_timesteps(spec, own, lambda candidate: 1.0, evaluations=60, stall_gain=0.05)
    # the window counts the simplex's runs only, after the solver's own timesteps and the family
    assert flat.stalled and flat.quality == 1.0
    assert STALL_PER_STEP * 3 < flat.evaluations <= 1 + len(FAMILY) + 2 + STALL_PER_STEP * 3
    unbounded = fit_timesteps(spec, own, lambda candidate: 1.0, evaluations=60)  # until the simplex converges
    assert not unbounded.stalled and unbounded.evaluations > flat.evaluations
    runs = []

    def rising(candidate: SolverSpec) -> float:  # every new run scores 0.1 above the last
        runs.append(candidate)
        return 0.1 * len(runs)

    climbing = fit_timesteps(spec, own, rising, evaluations=60, stall_gain=0.05)
    assert not climbing.stalled and climbing.evaluations == 60 and climbing.quality == pytest.approx(6.0)


def test_a_timestep_fit_scores_a_one_parameter_family_before_the_simplex():
    """Nelder-Mead in 10 or more dimensions needs more runs than a slow pipeline affords: the power
    schedules come first, so a handful of runs reaches a good schedule far from the solver's own."""
    spec, own = SolverSpec(name="unipc", steps=12), tuple(int(round(999 * (1 - i / 12))) for i in range(12))
    target = power_schedule(999, 12, 0.45)  # steps crowded at high noise, the last one at t=128
    assert target[-1] > 100 and target != own and power_schedule(999, 12, 1.0) == own

    def objective(candidate: SolverSpec) -> float:
        return -sum((a - b) ** 2 for a, b in zip(candidate.timesteps, target)) ** 0.5

    fit = fit_timesteps(spec, own, objective, evaluations=1 + len(FAMILY) + 2)
    assert fit.spec.timesteps == target and fit.quality == 0 > fit.start_quality
    assert fit.evaluations <= 1 + len(FAMILY) + 2
    enough = fit_timesteps(spec, own, objective, enough=-1.0)  # stops at the first run that reaches it
    assert enough.spec.timesteps == target and enough.evaluations == 1 + FAMILY.index(0.45) + 1


def test_the_joint_search_fits_timesteps_one_step_fewer_at_a_time_while_the_budget_holds(pipes, monkeypatch):
    monkeypatch.setattr("diffaccel.search.timesteps.EVALUATIONS_PER_STEP", 3)
    monkeypatch.setattr("diffaccel.search.fits.AMPLE", 1000.0)  # no fit clears by far: each runs to its cap
    calib = CalibrationRun(pipes[0], shapes_workload([0], 8, per_class=1))
    lines = []
    easy = JointSearch(calib, parse_budget("psnr>=1"), "macs", None, lines.append)
    found = easy.fitted([SolverSpec(name="ddim", steps=4), SolverSpec(name="unipc", steps=5)])
    assert [spec.steps for spec in found] == [3, 4] and all(spec.name == "unipc" for spec in found)
    assert all(len(spec.timesteps) == spec.steps and spec.timesteps[0] == 999 for spec in found)
    fitted = [c for c in easy.candidates if c.plan.method == "fitted-timesteps"]
    assert [c.plan.solver for c in fitted] == [s.model_copy(update={"coefficients": None, "model_timesteps": None})
                                               for s in found[::-1]]
    assert sum("timesteps fitted" in line for line in lines) == 2
    corrected = [c for c in easy.candidates if c.plan.method == "fitted-solver"]  # phase 1c: two fits per count
    assert len(corrected) == 4 and all(c.plan.solver.coefficients for c in corrected)
    told = [c for c in easy.candidates if c.plan.method == "fitted-model-timesteps"]
    assert told == [] and not any("its denoiser is told" in line for line in lines)  # told after phase 4
    for spec in found:  # each count keeps whichever of its fits scored best
        same = [c for c in fitted + corrected if c.plan.solver.timesteps == spec.timesteps]
        assert len(same) == 3 and max(same, key=lambda c: c.psnr).plan.solver == spec
    easy.refine()  # nothing below 3 steps to fit: the time left goes to the cheapest clearing fit's told timesteps
    told = [c for c in easy.candidates if c.plan.method == "fitted-model-timesteps"]
    assert sum("its denoiser is told, fitted" in line for line in lines) == 1 and len(told) <= 2  # + refitted
    assert all(c.plan.solver.steps == 3 == len(c.plan.solver.model_timesteps) for c in told)
    assert all(c.plan.solver.coefficients for c in told if c.source.endswith("(coefficients refitted)"))
    hard = JointSearch(calib, parse_budget("psnr>=200"), "macs", None, lambda _: None)
    assert hard.fitted([SolverSpec(name="unipc", steps=5)]) == [] and len(hard.candidates) == 3  # stops at a miss
    assert hard.fitted([SolverSpec(name="ddim", steps=5)]) == []  # DDIM assumes even steps: nothing to fit
    hard.refine()  # no fit clears: nothing to tell
    assert not any(c.plan.method == "fitted-model-timesteps" for c in hard.candidates)


def test_timestep_fits_start_near_the_budget_and_go_down_while_they_clear_it_else_up(pipes, monkeypatch):
    calib = CalibrationRun(pipes[0], shapes_workload([0], 4, per_class=1))
    joint = JointSearch(calib, parse_budget("psnr>=30"), "macs", None, lambda _: None)
    base = identity_plan(pipes[0].denoiser)
    for steps, psnr in ((5, 25.0), (6, 27.5), (7, 29.0), (8, 30.5), (10, 33.0)):  # phase 1's plain rows
        spec = SolverSpec(name="unipc", steps=steps)
        joint.candidates.append(Candidate(None, [], psnr, psnr - 5, 0.9, steps / 50, steps / 50, spec.label, 0, {},
                                          None, psnr - 5, base.model_copy(update={"solver": spec, "method": "steps"})))
    assert joint._first_fit("unipc", 8) == 6 and joint._first_fit("dpm++2", 8) == 7  # within 3 dB; else one fewer

    def run_fits(clears_from: int) -> tuple[list[int], list[int]]:
        tried = []

        def fake_fit(spec, warm):
            tried.append(spec.steps)
            fitted = spec.model_copy(update={"timesteps": tuple(range(999, 0, -999 // spec.steps))[:spec.steps]})
            psnr = 31.0 if spec.steps >= clears_from else 29.0
            return Candidate(None, [], psnr, 26.0, 0.9, 0.1, 0.1, "fit", 0, {}, None, 26.0,
                             base.model_copy(update={"solver": fitted}))

        monkeypatch.setattr(joint, "_fit", fake_fit)
        joint.fits.clear()  # a fresh phase 1b on the same phase-1 rows
        return tried, [spec.steps for spec in joint.fitted([SolverSpec(name="unipc", steps=8)])]

    assert run_fits(3) == ([6, 5, 4, 3], [3, 4, 5, 6])  # down from the first fit while they clear (to 3)
    assert run_fits(5) == ([6, 5, 4], [5, 6])  # ... and no further than the first miss
    assert run_fits(7) == ([6, 7], [7])  # the first fit missed: up until one clears
    assert run_fits(9) == ([6, 7], [])  # never below the plain sampler that cleared


def test_a_fit_that_clears_the_budget_by_far_is_cached_before_the_next_fit_and_only_once(pipes, monkeypatch):
    calib = CalibrationRun(pipes[0], shapes_workload([0], 4, per_class=1))
    joint = JointSearch(calib, parse_budget("psnr>=30"), "macs", None, lambda _: None)
    base = identity_plan(pipes[0].denoiser)
    reached = {7: 37.0, 6: 33.0, 5: 29.0}  # 7 steps clear by 7 dB, 6 by 3
    events = []

    def fake_fit(spec, warm):
        events.append(("fit", spec.steps))
        fitted = spec.model_copy(update={"timesteps": tuple(range(999, 0, -999 // spec.steps))[:spec.steps]})
        psnr = reached[spec.steps]
        return Candidate(None, [], psnr, psnr - 4, 0.9, 0.1, 0.1, "fit", 0, {}, None, psnr - 4,
                         base.model_copy(update={"solver": fitted}))

    monkeypatch.setattr(joint, "_fit", fake_fit)
    monkeypatch.setattr(joint, "cached", lambda spec: events.append(("cached", spec.steps)))
    assert [spec.steps for spec in joint.fitted([SolverSpec(name="unipc", steps=8)])] == [6, 7]
    assert events == [("fit", 7), ("cached", 7), ("fit", 6), ("fit", 5)]  # 6 is cached later, in phase 2

    profiles = []
    monkeypatch.setattr(joint_module, "CalibrationRun", lambda *args, **kw: profiles.append(kw["solver"]) or calib)
    again = JointSearch(calib, parse_budget("psnr>=30"), "macs", None, lambda _: None)
    monkeypatch.setattr(again, "_keys", lambda *args: None)
    spec = SolverSpec(name="unipc", steps=7)
    again.cached(spec)
    again.cached(spec)
    assert profiles == [spec]  # phase 2 runs once per setting


def test_a_fit_that_clears_the_budget_by_far_stops_there_and_skips_the_every_step_coefficient_fit(pipes,
                                                                                                    monkeypatch):
    monkeypatch.setattr("diffaccel.search.fits.AMPLE", 0.0)  # any run that clears is ample
    calib = CalibrationRun(pipes[0], shapes_workload([0], 8, per_class=1))
    lines = []
    joint = JointSearch(calib, parse_budget("psnr>=1"), "macs", None, lines.append)
    joint._fit(SolverSpec(name="unipc", steps=4), None)
    assert any("timesteps fitted in 1 runs" in line and "the fit stops" in line for line in lines)
    corrected = [c.source for c in joint.candidates if c.plan.method == "fitted-solver"]
    assert len(corrected) == 1 and corrected[0].endswith("(the last step)")


def test_the_next_fit_skips_counts_that_the_last_clearing_fits_gain_says_will_clear():
    plain = {5: 23.3, 6: 24.3, 7: 25.3, 8: 26.4, 9: 27.4, 10: 28.4, 12: 30.2, 15: 32.2}  # PSNR by step count
    # a fit at 12 gained 4.85 dB over the plain 12: to clear 32.25 a plain run needs 27.4 -> 9 (10 is 28.4)
    assert next_fit_count({12: True}, plain, 4.85, 32.25, 20) == 9
    assert next_fit_count({12: True}, plain, 1.0, 32.25, 20) == 11  # nothing predicted: one fewer
    assert next_fit_count({12: True, 9: False}, plain, 4.85, 32.25, 20) == 10  # overshot: halfway back up
    assert next_fit_count({12: True, 5: False}, plain, 9.9, 32.25, 20) == 8
    assert next_fit_count({12: True, 10: True, 9: False}, plain, 4.85, 32.25, 20) is None  # clear and miss meet
    assert next_fit_count({6: False}, plain, 0.0, 32.25, 8) == 7 and next_fit_count({7: False}, plain, 0, 32, 8) is None
    assert next_fit_count({3: True}, plain, 9.0, 20.0, 8) is None  # never below 3 steps


def test_refinement_restarts_the_fit_below_the_cheapest_clear_while_it_gains_and_caches_what_clears(pipes,
                                                                                                   monkeypatch):
    calib = CalibrationRun(pipes[0], shapes_workload([0], 4, per_class=1))
    joint = JointSearch(calib, parse_budget("psnr>=30"), "macs", None, lambda _: None)
    base = identity_plan(pipes[0].denoiser)
    # what each successive fit at a count reaches
    reached = {7: [31.5], 6: [31.0], 5: [29.0, 29.6, 30.2], 4: [27.0, 27.02]}
    calls, cached = [], []

    def fake_fit(spec, warm):
        calls.append((spec.steps, spec.timesteps is not None))  # (count, restarted from its timesteps)
        psnr = reached[spec.steps].pop(0)
        fitted = spec.model_copy(update={"timesteps": tuple(range(999, 0, -999 // spec.steps))[:spec.steps]})
        return Candidate(None, [], psnr, psnr - 4, 0.9, 0.1, 0.1, "fit", 0, {}, None, psnr - 4,
                         base.model_copy(update={"solver": fitted}))

    monkeypatch.setattr(joint, "_fit", fake_fit)
    monkeypatch.setattr(joint, "cached", lambda spec: cached.append(spec.steps))
    assert [spec.steps for spec in joint.fitted([SolverSpec(name="unipc", steps=8)])] == [6, 7]
    assert calls == [(7, False), (6, False), (5, False)]  # 7 (no plain rows: one below 8) clears, down to a miss
    calls.clear()
    joint.refine()
    # 5 restarted twice (+0.6 dB each) until it clears, cached, then a new fit at 4 and one restart gaining 0.02
    assert calls == [(5, True), (5, True), (4, False), (4, True)] and cached == [5]
    assert joint._cheapest_fit() == 5 and joint.fits[4].psnr == 27.0  # the restart that gained too little is not kept


def test_sampler_phase_goes_up_until_a_setting_clears_then_down_from_it_and_keeps_its_time_share(pipes,
                                                                                                   monkeypatch):
    calib = CalibrationRun(pipes[0], shapes_workload([0], 4, per_class=1))
    quality = {"unipc": 26.0, "dpm++3": 25.0, "dpm++2": 24.0, "evodiff": 26.0, "ddim": 18.0}  # PSNR at 5 steps

    def sweep(deadline, clock, plain=None):
        joint = JointSearch(calib, parse_budget("psnr>=30"), "macs", deadline, lambda _: None, plain=plain)
        scored = []

        def fake_score(plan, source, latency_scale=1.0):
            spec = plan.solver
            scored.append((spec.name, spec.steps))
            clock[0] += 1.0
            psnr = quality[spec.name] + (spec.steps - 5)
            return Candidate(None, [], psnr, psnr - 5, 0.9, spec.steps / 50, spec.steps / 50, spec.label, 0, {},
                             None, psnr - 5, plan)

        monkeypatch.setattr(joint, "score", fake_score)
        return [(spec.name, spec.steps) for spec in joint.samplers()], scored

    clock = [0.0]
    monkeypatch.setattr(joint_module, "time", SimpleNamespace(time=lambda: clock[0]))  # one second a run
    found, scored = sweep(None, clock)
    assert found == [("unipc", 9), ("evodiff", 9)]
    # UniPC up from 5 until it clears at 9; the others down from 9, each to its first miss
    assert scored == [("unipc", n) for n in range(5, 10)] + [("dpm++3", 9), ("dpm++2", 9), ("evodiff", 9),
                                                            ("evodiff", 8), ("ddim", 9)]
    clock[0] = 0.0
    found, scored = sweep(None, clock, plain=parse_budget("psnr>=28"))  # down while the user's own budget holds
    assert found == [("unipc", 9), ("evodiff", 9)]
    assert [s for s in scored if s[0] == "dpm++3"] == [("dpm++3", 9), ("dpm++3", 8), ("dpm++3", 7)]
    clock[0] = 0.0
    found, scored = sweep(20.0, clock)  # 40% of 20 s: once something cleared, the phase stops at 8 s
    assert found == [("unipc", 9), ("evodiff", 9)] and scored[-1] == ("evodiff", 9) and len(scored) == 8


def test_on_a_flow_matching_pipeline_the_sampler_phase_runs_its_flow_solvers_and_fits_their_timesteps():
    """diffusers' StableDiffusion3Pipeline (tiny, random) has a FlowMatchEulerDiscreteScheduler: the
    joint search runs the solvers that have a flow mode at fewer steps (not EVODiff, which needs a
    betas schedule) and fits their timesteps and coefficients, says once that told timesteps are left
    out, and no setting fails."""
    pipe, kwargs = build_case("sd3")
    lines: list[str] = []
    joint = JointSearch(CalibrationRun(pipe, as_workload([kwargs])), parse_budget("psnr>=25"), "macs", None,
                        lines.append, space=joint_module.JointSpace(steps=(4, 6)))
    found = joint.samplers()
    scored = {c.plan.solver.name for c in joint.candidates}
    assert found and scored == {"unipc", "dpm++3", "dpm++2", "ddim"} and joint.flow
    assert [line for line in lines if "flow-matching" in line and "no told timesteps" in line]
    joint.fitted(found)
    fitted = [c.plan.solver for c in joint.candidates if c.plan.solver.timesteps is not None]
    assert fitted and any(s.coefficients is not None for s in fitted) and not any("failed" in line for line in lines)
    assert not any("not fitted" in line for line in lines)
    joint.run()
    later = [line for line in lines if "flow-matching" not in line]
    assert not any("failed" in line or "told" in line for line in later)
    sd, sd_kwargs = build_case("sd-pndm")
    assert JointSearch(CalibrationRun(sd, as_workload([sd_kwargs])), parse_budget("psnr>=25"), "macs", None,
                       lines.append)._solvers_applying() == joint_module.JointSpace().solvers


def test_a_pipeline_that_cannot_take_a_guidance_prediction_is_told_so_once():
    """Flux (guidance-distilled: no doubled guidance batch) refuses the prediction for every plan; the
    joint search tries it once, says it leaves it out, and goes on."""
    pipe, kwargs = build_case("flux")
    lines: list[str] = []
    joint = JointSearch(CalibrationRun(pipe, as_workload([kwargs])), parse_budget("psnr>=25"), "macs", None,
                        lines.append, space=joint_module.JointSpace(steps=(4, 6)))
    joint.run()
    refused = [line for line in lines if "not fitted" in line]
    assert len(refused) == 1 and "left out of the rest of the search" in refused[0] and "doubled" in refused[0]
    assert len(joint.candidates) > 5


@pytest.mark.parametrize("case", ["sd-euler-ancestral", "sd-ddim-eta"])
def test_a_sampler_that_adds_noise_at_every_step_keeps_the_sampler_phase_out_with_the_reason(case):
    """Against an ancestral sampler or DDIM at eta=1 every deterministic solver scores the same low
    PSNR whatever its steps (the reference is one draw of a stochastic trajectory): the phase says why
    and is skipped; the caching plans on the pipeline's own sampler remain."""
    pipe, kwargs = build_case(case)  # sd-ddim-eta's call carries eta=1
    lines: list[str] = []
    joint = JointSearch(CalibrationRun(pipe, as_workload([kwargs])), parse_budget("psnr>=25"), "macs", None,
                        lines.append)
    assert not joint._solvers_applying() and len(lines) == 1 and "fresh noise at every step" in lines[0]
    if case == "sd-ddim-eta":
        assert "eta=1" in lines[0]
        deterministic = JointSearch(CalibrationRun(pipe, as_workload([{**kwargs, "eta": 0.0}])),
                                    parse_budget("psnr>=25"), "macs", None, lines.append)
        assert deterministic._solvers_applying()

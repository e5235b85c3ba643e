"""diffaccel on stock diffusers pipelines (tiny configs, random weights, offline) and a user's own
pipeline: exact all-compute runs with every scheduler, every applicable method, the search, PTQ,
plans mapped to other step counts, and plans fitted on other weights."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
)

import diffaccel
from diffaccel import methods
from diffaccel.adapters import find_denoiser
from diffaccel.calibration.reference import identity_plan
from diffaccel.calibration.workload import Workload
from diffaccel.errors import MethodError, PlanError, QuantError, UnsupportedModelError, WorkloadError
from diffaccel.eval.cost import plan_mac_fraction
from diffaccel.lm import make_lm_plan
from diffaccel.methods.registry import METHODS, applicable, build
from diffaccel.plan import Plan
from diffaccel.runtime import PlanWarning
from diffaccel.search import search
from diffaccel.search.heldout import compare
from diffaccel.solvers.spec import SolverSpec
from diffaccel.steps import model_evaluations
from stock_pipelines import CASES, sd_scheduler, sdxl, stable_diffusion
from stock_pipelines import build as build_case

NAMES = list(CASES)


def run(pipe, call: dict, seed: int = 0) -> torch.Tensor:
    return pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="pt").images


def untouched(pipe) -> bool:
    model, scheduler = find_denoiser(pipe)
    patched = [m for m in model.modules() if "forward" in vars(m) or "_diffaccel_executor" in vars(m)]
    hooked = [n for n in ("step", "set_timesteps", "set_begin_index") if n in vars(scheduler)]
    return not patched and not hooked


def workload(call: dict) -> Workload:
    return Workload.from_calls([call, call], seed=123)  # two calls, other noise than the checks below


@pytest.mark.parametrize("name", NAMES)
def test_all_compute_plan_is_bitwise_identical_and_leaves_the_pipeline_as_it_was(name):
    pipe, call = build_case(name)
    base = run(pipe, call)
    model, scheduler = find_denoiser(pipe)
    steps = model_evaluations(scheduler, call["num_inference_steps"])
    plan = methods.fora(pipe, steps, interval=1)  # a static plan that computes every unit at every step
    with diffaccel.accelerate(pipe, plan) as executor:
        out = run(pipe, call)
    assert torch.equal(out, base), (name, float((out - base).abs().max()))
    assert executor.stats.macs == executor.stats.full_macs > 0 and executor.stats.steps == steps
    assert untouched(pipe) and torch.equal(run(pipe, call), base)


def test_schedulers_that_repeat_timesteps_count_every_evaluation():
    """PNDM evaluates the model N + 1 times, Heun 2N - 1: a plan counts evaluations, and one made for
    the inference step count is refused with the count it needs, never silently misaligned."""
    assert model_evaluations(build_case("sd-pndm")[0].scheduler, 10) == 11
    assert model_evaluations(build_case("sd-heun")[0].scheduler, 10) == 19
    pipe, call = build_case("sd-pndm")
    plan = methods.fora(pipe, call["num_inference_steps"], interval=2)
    with pytest.raises(PlanError, match=r"plan is for 6 steps but the pipeline runs 7.*resample"):
        with diffaccel.accelerate(pipe, plan):
            run(pipe, call)
    assert untouched(pipe)


@pytest.mark.parametrize("name", NAMES)
def test_every_applicable_method_builds_a_plan_from_the_pipeline_and_runs(name):
    pipe, call = build_case(name)
    calls = workload(call)
    base = run(pipe, call)
    names = applicable(pipe)
    assert {"fora", "taylorseer", "keysteps", "erta", "ptq"} <= set(names)
    # random weights move a lot between steps: settings that make every method reuse something
    special = {"ptq": {"bits": "w8a8"}, "keysteps": {"keys": 3}, "erta": {"threshold": 10.0, "warmup": 1}}
    for method in names:
        settings = special.get(method, {})
        plan = build(method, pipe, call["num_inference_steps"], calls=calls, **settings)
        with diffaccel.accelerate(pipe, plan) as executor:
            out = run(pipe, call)
        assert torch.isfinite(out).all() and out.shape == base.shape, (name, method)
        if method == "ptq":
            assert plan.quant is not None and plan.calibration.calls == 2
        elif plan.rule is None:
            assert executor.stats.macs < executor.stats.full_macs, (name, method)
        if METHODS[method].calibrated:
            assert plan.calibration is not None and plan.calibration.weights
        assert untouched(pipe)


def test_a_plan_fitted_with_one_scheduler_warns_under_another():
    pipe, call = build_case("sd-ddim-eta")
    plan = methods.keysteps(pipe, workload(call), keys=3)
    assert plan.calibration.scheduler == "DDIMScheduler"
    own = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(own.config)
    try:
        with pytest.warns(PlanWarning, match="fitted with DDIMScheduler; the pipeline runs EulerDiscreteScheduler"):
            with diffaccel.accelerate(pipe, plan):
                run(pipe, call)
    finally:
        pipe.scheduler = own
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanWarning)
        with diffaccel.accelerate(pipe, plan):  # its own scheduler: no warning
            run(pipe, call)
    pipe.scheduler = DDIMScheduler.from_config(own.config, clip_sample=not own.config.clip_sample)
    try:
        with pytest.warns(PlanWarning, match="fitted with DDIMScheduler set otherwise than the pipeline's: "
                                             "clip_sample="):
            with diffaccel.accelerate(pipe, plan):
                run(pipe, call)
    finally:
        pipe.scheduler = own
    assert Plan.from_dict(json.loads(plan.to_json())).calibration.scheduler_config == plan.calibration.scheduler_config


def test_a_correction_with_nothing_to_fit_says_so_and_leaves_the_plan_as_it_was():
    """Flux's blocks return (text, image) pairs: a per-channel correction has no unit to fit there."""
    pipe, call = build_case("flux")
    calls = workload(call)
    plan = methods.keysteps(pipe, calls, keys=3)
    with pytest.warns(PlanWarning, match="no feature correction was fitted.*several tensors on a FluxTransformer"):
        corrected = methods.keysteps(pipe, calls, keys=3, correct=True)
    assert corrected.feature_correction is None and corrected.schedule == plan.schedule
    outputs = []
    for p in (plan, corrected):
        with diffaccel.accelerate(pipe, p):
            outputs.append(run(pipe, call))
    assert torch.equal(*outputs)


@pytest.mark.parametrize("name", ["sd-pndm", "pixart-alpha", "flux", "user-pipeline"])
def test_dp_search_finds_a_plan_on_the_pipeline(name, tmp_path):
    pipe, call = build_case(name)
    plan = diffaccel.find_plan(pipe, calls=workload(call), budget="psnr>=10", strategy="dp", heldout=None,
                               k_values=(2, 3), out=tmp_path, log=lambda _: None)
    assert (tmp_path / "plan.json").is_file() and plan.calibration is not None
    with diffaccel.accelerate(pipe, plan) as executor:
        assert torch.isfinite(run(pipe, call)).all()
    assert executor.stats.macs < executor.stats.full_macs and untouched(pipe)


def test_calibrated_methods_refuse_calls_at_mixed_step_counts_or_sizes_before_running():
    """ERTA crashed mid-fit on them and per-step PTQ built scales of two trajectories, silently."""
    pipe, call = build_case("sd-pndm")
    steps = [{**call, "num_inference_steps": 6}, {**call, "num_inference_steps": 8}]
    sizes = [{**call, "height": 16, "width": 16}, {**call, "height": 32, "width": 32}]
    makers = {"keysteps": lambda calls: methods.keysteps(pipe, calls, keys=3),
              "erta": lambda calls: methods.erta(pipe, calls, threshold=0.5),
              "ptq": lambda calls: methods.ptq(pipe, calls, bits="w8a8", per_step=True)}
    for make in makers.values():
        with pytest.raises(WorkloadError, match=r"different step counts \(\['6', '8'\]\).*same num_inference_steps"):
            make(steps)
        with pytest.raises(WorkloadError, match="different image sizes"):
            make(sizes)
    assert untouched(pipe)


def test_a_plan_on_the_model_alone_under_a_scheduler_that_repeats_timesteps_is_refused_or_warned():
    """Without the pipeline the executor counts steps by timestep, and PNDM evaluates some timesteps
    twice: a plan calibrated under PNDM is refused on the bare U-Net (it ran misaligned), an
    uncalibrated step-indexed plan warns."""
    pipe, call = build_case("sd-pndm")
    steps = model_evaluations(pipe.scheduler, call["num_inference_steps"])
    calibrated = methods.keysteps(pipe, workload(call), keys=3)
    assert calibrated.calibration.scheduler == "PNDMScheduler"
    with pytest.raises(PlanError, match="PNDMScheduler, which evaluates some timesteps twice.*accelerate\\(pipe"):
        diffaccel.accelerate(pipe.unet, calibrated).__enter__()
    with pytest.warns(PlanWarning, match="model alone counts steps"):
        with diffaccel.accelerate(pipe.unet, methods.fora(pipe.unet, steps, interval=2)):
            pass
    with diffaccel.accelerate(pipe, calibrated):  # through the pipeline it runs
        assert torch.isfinite(run(pipe, call)).all()
    assert untouched(pipe)


def test_quantization_keeps_the_caching_schedule_of_a_unit_that_is_itself_a_swapped_layer():
    """A U-Net's ``conv_in`` unit is one Conv2d, which quantization swaps for its stand-in: the stand-in
    is what the executor wraps, so the plan's reuse holds there too (it ran at every step, uncounted)."""
    pipe, call = build_case("sd-pndm")
    cached = methods.keysteps(pipe, workload(call), keys=3)
    quantized = methods.ptq(pipe, workload(call), bits="w8a8", cache=cached)
    assert quantized.schedule == cached.schedule and quantized.units[0] == "conv_in"
    results = []
    for plan in (cached, quantized):
        with diffaccel.accelerate(pipe, plan) as executor:
            run(pipe, call)
        results.append(executor.stats)
    units, steps = len(cached.units), len(cached.schedule)
    assert [s.computed + s.reused for s in results] == [units * steps] * 2
    assert results[1].macs == results[0].macs < results[0].full_macs and untouched(pipe)


def test_w8a8_ptq_calibrates_on_the_pipeline_and_refuses_other_weights():
    pipe, call = build_case("pixart-alpha")
    base = run(pipe, call)
    plan = methods.ptq(pipe, workload(call), bits="w8a8")
    with diffaccel.accelerate(pipe, plan):
        out = run(pipe, call)
    assert not torch.equal(out, base) and (out - base).abs().mean() < 0.05 and untouched(pipe)
    assert plan.num_steps is None  # quantization alone runs at any step count
    with diffaccel.accelerate(pipe, plan):
        assert run(pipe, {**call, "num_inference_steps": 4}).shape == base.shape
    other, _ = build_case("pixart-alpha")
    with torch.no_grad():
        other.transformer.proj_out.weight.mul_(1.01)
    with pytest.raises((QuantError, PlanError), match="other weights|another model"):
        with diffaccel.accelerate(other, plan):
            pass
    assert untouched(other)


def test_a_cached_calibration_is_not_reused_under_another_scheduler_or_text_encoder():
    """Activation ranges follow the trajectory: the calibration cache keys on the pipeline's other
    modules and its scheduler too, not only the denoiser's weights and the calls."""
    pipe, call = build_case("sd-pndm")
    calls = workload(call)
    first = methods.ptq(pipe, calls, bits="w8a8").quant.calibration
    assert methods.ptq(pipe, calls, bits="w8a8").quant.calibration == first  # the same pipeline: cached
    own = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(own.config)
    try:
        plan = methods.ptq(pipe, calls, bits="w8a8", per_step=True)
        assert plan.quant.calibration != first and plan.calibration.scheduler == "DDIMScheduler"
        with diffaccel.accelerate(pipe, plan):  # calibrated on DDIM's 6 steps, not PNDM's 7
            run(pipe, call)
    finally:
        pipe.scheduler = own
    with torch.no_grad():
        next(pipe.text_encoder.parameters()).mul_(3)
    assert methods.ptq(pipe, calls, bits="w8a8").quant.calibration not in (first, plan.quant.calibration)


def test_a_calibrated_plan_on_other_weights_warns():
    pipe, call = build_case("dit")
    plan = methods.keysteps(pipe, workload(call), keys=3)
    assert plan.calibration.inputs == ["1", "3"] and plan.calibration.calls == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with diffaccel.accelerate(pipe, plan):
            run(pipe, call)
    other, _ = build_case("dit")
    with torch.no_grad():
        other.transformer.proj_out_2.bias.add_(0.01)
    with pytest.warns(PlanWarning, match="other weights"):
        with diffaccel.accelerate(other, plan):
            run(other, call)


def test_a_plan_for_50_steps_runs_at_28_with_the_mac_ratio_it_promises():
    pipe, call = build_case("dit")
    plan50 = methods.fora(pipe, 50, interval=3)
    units = identity_plan(pipe.transformer).units
    unit_macs = [len(units) + 1.0] + [1.0] * len(units)  # all the work in the units but a sliver
    promised = 1 / plan_mac_fraction(plan50, unit_macs)
    plan28 = plan50.resample(28)
    assert plan28.num_steps == 28 and plan28.params["resampled_from"] == 50
    assert 1 / plan_mac_fraction(plan28, unit_macs) == pytest.approx(promised, rel=0.08)
    call = {**call, "num_inference_steps": 28}
    with pytest.raises(PlanError, match="plan is for 50 steps but the pipeline runs 28"):
        with diffaccel.accelerate(pipe, plan50):
            run(pipe, call)
    with diffaccel.accelerate(pipe, plan50, resample=True) as executor:
        mapped = run(pipe, call)
    with diffaccel.accelerate(pipe, plan28) as direct:
        assert torch.equal(run(pipe, call), mapped)
    measured = executor.stats.full_macs / executor.stats.macs
    assert measured == pytest.approx(direct.stats.full_macs / direct.stats.macs)
    assert measured == pytest.approx(1 / plan_mac_fraction(plan28, next(iter(executor.unit_macs.values()))))
    assert untouched(pipe)


def test_resampling_keeps_a_schedule_dense_where_it_was_dense():
    from diffaccel.resample import resample_rows

    rows = ["C"] * 10 + ["CR", "RR", "RR", "CC"] * 10
    rows = ["CC" if r == "C" else r for r in rows][:50]
    new = resample_rows(rows, 25)
    assert new[0] == "CC" and len(new) == 25
    assert sum(r[0] == "C" for r in new[:5]) == 5  # the all-compute start stays all-compute
    for unit in (0, 1):
        old = sum(r[unit] == "C" for r in rows) / 50
        assert sum(r[unit] == "C" for r in new) / 25 == pytest.approx(old, abs=0.05)
    assert resample_rows(rows, 50) == rows


def test_the_held_out_mac_speedup_counts_the_whole_call_as_the_clock_does():
    """Fewer denoiser steps leave the text encoder and the VAE decoder as they were: the held-out
    MAC speedup of the whole call is below the denoiser's own, and an all-compute plan's is 1."""
    pipe, call = build_case("sd-dpm-multistep")
    model = find_denoiser(pipe)[0]
    fewer = identity_plan(model).model_copy(update={"solver": SolverSpec(name="unipc", steps=3), "method": "steps"})
    record = compare(pipe, workload(call), fewer, pairs=1)
    assert 1 < record["speedup_macs"] < record["speedup_macs_denoiser"] == pytest.approx(2)  # 6 steps -> 3
    assert compare(pipe, workload(call), identity_plan(model), pairs=1)["speedup_macs"] == 1
    assert untouched(pipe)


def test_a_prompt_lines_own_seed_sets_its_noise_in_every_image_set():
    """A JSON prompt line's ``seed`` was overwritten by diffaccel's own (every seed gave the same
    images); it is an offset from each set's base, so calibration and evaluation images stay apart."""
    from diffaccel.targets import Target

    pipe, call = build_case("dit")
    target = Target("dit", pipe, [{"class_labels": [1], "seed": 5}, {"class_labels": [3]}])
    evaluation = target.workload(4, 3.0, per_class=2, calibration=False)
    assert [c.seeds for c in evaluation.calls] == [(5,), (6,), (2,), (3,)]
    calibration = target.workload(4, 3.0, per_class=2)
    assert not {c.seeds for c in calibration.calls} & {c.seeds for c in evaluation.calls}
    for bad in ("abc", -5, True):
        with pytest.raises(WorkloadError, match="seed must be a whole number >= 0"):
            Target("dit", pipe, [{"class_labels": [1], "seed": bad}]).workload(4, 3.0, per_class=1)
    with pytest.raises(WorkloadError, match=r"failed on the call for 2000 .*IndexError"):
        Target("dit", pipe, [{"class_labels": [2000]}]).workload(2, 3.0, per_class=1)(pipe)  # was a traceback


def test_the_mac_count_follows_the_text_length_not_only_the_image_size():
    """SD3's joint attention runs over the text tokens too: a call with 60 tokens costs more than one
    with 5 at the same image size, in the same ``with`` block as after it, and each call's count is
    what a fresh pipeline measures for it (the MACs of a shape were once remembered by the image's
    shape alone, so the longer call read the shorter one's count)."""
    def long(call):
        g = torch.Generator().manual_seed(7)
        return {**call, "prompt_embeds": torch.randn(2, 60, 16, generator=g),
                "negative_prompt_embeds": torch.randn(2, 60, 16, generator=g)}

    def full_macs(pipe, calls):
        counts = []
        with diffaccel.accelerate(pipe, methods.fora(pipe, 6, interval=2)) as run:
            for call in calls:
                pipe(**call, output_type="latent")
                counts.append(run.stats.full_macs)
        return counts

    pipe, call = CASES["sd3"][0]()
    short_then_long = full_macs(pipe, [call, long(call)])
    fresh_long = full_macs(CASES["sd3"][0]()[0], [long(call)])
    assert short_then_long[1] > 1.5 * short_then_long[0] and short_then_long[1] == fresh_long[0]


def test_a_saved_plan_on_dpm_solver_does_not_warn_of_a_changed_scheduler(tmp_path):
    """DPM-Solver's ``lambda_min_clipped`` is -inf by default, which a plan file keeps as null: the
    plan read back on the same pipeline must not read it as a setting changed since calibration."""
    pipe, call = CASES["sd-dpm-multistep"][0]()
    plan = methods.keysteps(pipe, [call], keys=3)
    plan.save(tmp_path / "plan.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanWarning)
        with diffaccel.accelerate(pipe, Plan.load(tmp_path / "plan.json")):
            pipe(**call, output_type="latent")
    pipe.scheduler.register_to_config(lambda_min_clipped=-5.0)  # a setting that did change still warns
    with pytest.warns(PlanWarning, match="lambda_min_clipped=-5.0"):
        with diffaccel.accelerate(pipe, Plan.load(tmp_path / "plan.json")):
            pass


def test_an_image_to_image_call_runs_a_plan_for_the_evaluations_it_makes():
    """At strength 0.5 a 6-step DDIM img2img call evaluates the denoiser 3 times (t = 333, 167, 1; DDIM
    keeps no begin index): a plan's steps are those 3 evaluations. A 6-step plan is refused with the
    count to make it for (it had run its first 3 rows, made for t = 999.., on those timesteps)."""
    pipe, call = CASES["sd-pndm"][0]()
    i2i = StableDiffusionImg2ImgPipeline(**{**pipe.components, "scheduler": DDIMScheduler()})
    i2i.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def run():
        return i2i(prompt=call["prompt"], image=image, strength=0.5, num_inference_steps=6, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images

    plain = run()
    with diffaccel.accelerate(i2i, methods.fora(pipe, 3, interval=1)) as full:
        assert torch.equal(run(), plain) and full.stats.steps == 3
    with diffaccel.accelerate(i2i, methods.fora(pipe, 3, interval=2)) as cached:
        out = run()
    assert cached.stats.reused > 0 and cached.stats.macs < cached.stats.full_macs and torch.isfinite(out).all()
    with pytest.raises(PlanError, match="runs 3 .*the last 3 of its 6-step schedule.*make the plan for 3 steps"):
        with diffaccel.accelerate(i2i, methods.fora(pipe, 6, interval=2)):
            run()
    assert torch.equal(run(), plain)


def test_a_plan_that_cannot_be_mapped_is_refused_before_the_log_says_it_was(caplog):
    pipe, call = CASES["dit"][0]()
    every = Plan.from_dict({**methods.fora(pipe, 6, interval=2).model_dump(), "schedule": ["CCC"] * 6})
    guided = methods.fit_guidance(pipe, every, steps=[5], calls=[call])
    with caplog.at_level("INFO", logger="diffaccel"), pytest.raises(PlanError):
        with diffaccel.accelerate(pipe, guided, resample=True):
            pipe(**{**call, "num_inference_steps": 8}, output_type="latent")
    assert not any("mapped to" in r.getMessage() for r in caplog.records)


def test_a_solver_plan_warns_only_when_the_noise_schedule_it_was_fitted_on_changed():
    """A plan with a solver section brings its own sampler, built on the pipeline's noise schedule:
    another scheduler class on the same schedule is no news; another flow shift (or betas) is, as its
    fitted timesteps and coefficients followed the old one."""
    pipe, call = CASES["sd3"][0]()
    plan = methods.keysteps(pipe, [call], keys=4).model_copy(update={"solver": SolverSpec(name="unipc", steps=6)})
    assert plan.calibration.scheduler_config["shift"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanWarning)
        with diffaccel.accelerate(pipe, plan):
            pipe(**call, output_type="latent")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    with pytest.warns(PlanWarning, match="a noise schedule set otherwise .*shift=3.0 \\(fitted with 1.0\\)"):
        with diffaccel.accelerate(pipe, plan):
            pass
    sd, sd_call = CASES["sd-pndm"][0]()  # another sampler class on the same betas: silent
    sd_plan = Plan.from_dict({**methods.keysteps(sd, [sd_call], keys=4).model_dump(), "schedule": None,
                              "num_steps": None, "solver": {"name": "unipc", "steps": 5}})
    sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanWarning)
        with diffaccel.accelerate(sd, sd_plan):
            sd(**sd_call, output_type="latent")


def test_a_quantized_plan_records_the_images_it_was_calibrated_on():
    pipe, call = CASES["sd-pndm"][0]()  # 2 prompts a call, 2 calls: 4 images
    plan = methods.ptq(pipe, [call, {**call, "seed": 9}], bits="w8a8", backend="fake")
    assert plan.calibration.images == 4 and plan.calibration.calls == 2


def test_plan_show_says_a_per_step_quantized_plan_runs_only_at_its_calibrated_steps():
    from diffaccel.report.plan_view import render_plan

    pipe, call = CASES["sd-pndm"][0]()
    plan = methods.ptq(pipe, [call], bits="w8a8", backend="fake", per_step=True)
    assert f"only at the {plan.calibration.steps} steps its per-step quantization" in render_plan(plan)
    unrecorded = plan.model_copy(update={"calibration": None})  # as `generate --quant-per-step --save-plan` writes it
    assert f"only at the {plan.calibration.steps} steps" in render_plan(unrecorded)  # had said "any number of steps"


def _drop_guidance_at(step: int):
    """diffusers' documented dynamic-CFG callback: from ``step`` on, the conditional half alone."""
    def callback(pipe, index, timestep, kwargs):
        if index == step:
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return kwargs
    return callback


def test_a_callback_that_drops_guidance_mid_run_recomputes_instead_of_serving_the_old_batch():
    pipe, call = stable_diffusion(sd_scheduler("DDIMScheduler", clip_sample=False))
    call = {**call, "num_inference_steps": 10, "callback_on_step_end": _drop_guidance_at(4),
            "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}
    base = run(pipe, call)
    with diffaccel.accelerate(pipe, methods.fora(pipe, 10, interval=1)):
        assert torch.equal(run(pipe, call), base)
    for plan in (methods.fora(pipe, 10, interval=2), methods.deepcache(pipe, 10, interval=3),
                 methods.taylorseer(pipe, 10, interval=3), methods.faster_diffusion(pipe, 10, interval=3, warmup=1)):
        with diffaccel.accelerate(pipe, plan) as ex:  # each had served its batch-of-4 caches to a batch of 2
            out = run(pipe, call)
        assert out.shape == base.shape and torch.isfinite(out).all() and ex.stats.mac_ratio > 1, plan.method


def test_parallel_decoding_repeats_nested_conditions_and_follows_a_prompt_changed_midway():
    pipe, call = sdxl()  # its pooled text embeddings and time ids sit in a dict, added_cond_kwargs
    outputs = {}
    for parallel in (False, True):
        plan = methods.faster_diffusion(pipe, 8, interval=4, warmup=1, parallel=parallel)
        with diffaccel.accelerate(pipe, plan):  # parallel=True had stopped on a batch-size mismatch
            outputs[parallel] = run(pipe, call)
    assert torch.allclose(outputs[True], outputs[False], atol=1e-5)
    pipe, call = stable_diffusion(sd_scheduler("DDIMScheduler", clip_sample=False))
    other = pipe.encode_prompt(["a large blue circle", "a small red square"], "cpu", 1, True, ["", ""])
    swapped = torch.cat([other[1], other[0]])

    def swap(pipe, index, timestep, kwargs):
        if index == 3:
            kwargs["prompt_embeds"] = swapped
        return kwargs

    call = {**call, "num_inference_steps": 10, "callback_on_step_end": swap,
            "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}
    for parallel in (False, True):
        with diffaccel.accelerate(pipe, methods.faster_diffusion(pipe, 10, interval=4, warmup=2, parallel=parallel)):
            outputs[parallel] = run(pipe, call)
    assert torch.equal(outputs[True], outputs[False])  # the steps batched ahead had kept the old prompt


def test_noise_injection_adds_the_initial_noise_whatever_the_scheduler_scales_it_by():
    changes = {}
    for name, extra in (("DDIMScheduler", {"clip_sample": False}), ("EulerDiscreteScheduler", {}),
                        ("HeunDiscreteScheduler", {})):
        pipe, call = stable_diffusion(sd_scheduler(name, **extra))
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        steps = model_evaluations(pipe.scheduler, call["num_inference_steps"])
        latents = {}
        for strength in (0.0, 0.02):
            plan = methods.faster_diffusion(pipe, steps, interval=3, warmup=1, parallel=False, noise_strength=strength)
            with diffaccel.accelerate(pipe, plan) as ex:
                latents[strength] = pipe(**call, latents=noise, output_type="latent").images
        injection = next(f for f in ex.features if type(f).__name__ == "NoiseInjection")
        assert torch.allclose(injection.z, noise, atol=1e-5)  # had been noise x 14.6 under Euler and Heun
        changes[name] = float((latents[0.02] - latents[0.0]).std())
    assert max(changes.values()) < 2 * min(changes.values()), changes  # had been 15-22x DDIM's


def test_a_scheduler_replaced_inside_the_block_is_refused_not_run_misaligned():
    pipe, call = stable_diffusion(sd_scheduler("DDIMScheduler", clip_sample=False))
    heun = sd_scheduler("HeunDiscreteScheduler")
    plan = methods.fora(pipe, model_evaluations(heun, call["num_inference_steps"]), interval=2)
    with diffaccel.accelerate(pipe, plan):
        pipe.scheduler = heun  # its steps are not counted: the plan's rows would fall on the wrong evaluations
        with pytest.raises(PlanError, match="scheduler was replaced inside the accelerate block"):
            run(pipe, call)
    assert untouched(pipe)


def test_a_plan_on_the_model_alone_says_when_a_run_was_shorter_and_refuses_resample():
    """The model alone cannot tell a run's length: a 10-step plan run for 6 steps had run its first
    rows without a word, and ``resample=True`` was ignored there."""
    pipe, call = build_case("dit")
    plan = methods.fora(pipe, 10, interval=3)
    with pytest.raises(PlanError, match="resample=True .* only the pipeline's scheduler"):
        diffaccel.accelerate(pipe.transformer, plan, resample=True).__enter__()
    assert untouched(pipe)
    with pytest.warns(PlanWarning, match="ran at most 6 steps under a plan for 10"):
        with diffaccel.accelerate(pipe.transformer, plan):
            run(pipe, {**call, "num_inference_steps": 6})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with diffaccel.accelerate(pipe.transformer, plan):
            run(pipe, {**call, "num_inference_steps": 10})
    assert not [w for w in caught if "ran at most" in str(w.message)]
    assert untouched(pipe)


def test_warnings_point_at_the_users_line_and_the_step_is_known_to_hooks_on_the_denoiser():
    pipe, call = build_case("sd-pndm")
    steps = model_evaluations(pipe.scheduler, call["num_inference_steps"])
    with pytest.warns(PlanWarning) as caught:
        with diffaccel.accelerate(pipe.unet, methods.fora(pipe.unet, steps, interval=2)):
            pass
    assert {w.filename for w in caught} == {__file__}  # had been session.py and contextlib.py
    seen = []
    with diffaccel.accelerate(pipe, methods.fora(pipe, steps, interval=2)) as executor:
        handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(executor.current_step))
        run(pipe, call)
        handle.remove()
    assert seen == list(range(steps))  # had been None at every step


def test_a_plan_edited_with_model_copy_is_checked_where_it_is_applied():
    """``model_copy(update=...)`` skips pydantic's checks (the docs show it for adding a solver): a
    misspelled action letter had run as forecasts, a dict for the solver had failed deep inside."""
    pipe, call = build_case("dit")
    plan = methods.fora(pipe, 6, interval=2)
    bad = plan.model_copy(update={"schedule": ["XXX"] * 6})
    with pytest.raises(PlanError, match="unknown action 'X'"):
        diffaccel.accelerate(pipe, bad).__enter__()
    assert untouched(pipe)
    as_dict = plan.model_copy(update={"solver": {"name": "unipc", "steps": 6}})
    expected = SolverSpec(name="unipc", steps=6)
    with diffaccel.accelerate(pipe, as_dict) as executor:
        run(pipe, call)
    assert executor.plan.solver == expected
    with pytest.raises(PlanError, match="enable takes the plans of image pipelines"):
        diffaccel.enable(pipe, make_lm_plan("dkv-decode"))
    with pytest.raises(PlanError, match="Plan.load"):
        diffaccel.enable(pipe, "plan.json")


def test_a_precision_plan_on_a_half_precision_unet_is_refused_before_it_runs():
    pipe, call = stable_diffusion(sd_scheduler("DDIMScheduler"))
    pipe.to(torch.float16)
    plan = methods.fora(pipe, call["num_inference_steps"], interval=2).model_copy(update={"precision": "bfloat16"})
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(PlanError, match="weights are float16.*drop the plan's precision"):
        diffaccel.accelerate(pipe, plan).__enter__()  # had been torch's "mixed dtype (CPU)" mid-call
    assert untouched(pipe) and all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in state.items())


def test_method_and_search_inputs_a_user_would_plausibly_pass():
    pipe, call = build_case("dit")
    with pytest.raises(MethodError, match="interval must be a number, not True"):
        methods.fora(pipe, 6, interval=True)  # had become interval 1: an all-compute plan
    with pytest.raises(MethodError, match="give num_steps"):
        methods.fora(pipe, None)
    assert methods.keysteps(pipe, dict(call), keys=3).calibration.calls == 1  # one call's dict, not its keys
    compiled = torch.compile(pipe.transformer)
    with pytest.raises(UnsupportedModelError, match="compiled.*_orig_mod"):
        methods.fora(compiled, 6)
    with pytest.raises(ValueError, match="unknown strategy"):  # a SettingError: also a ValueError
        search(pipe, [dict(call)], strategy="nope")


def test_a_reused_output_changed_in_place_downstream_does_not_change_the_cache():
    """FreeU scales the next up block's input in place, and a T2I-Adapter adds its residual in place:
    the cached output had been handed out itself, so it grew at every reuse."""
    pipe, call = stable_diffusion(sd_scheduler("DDIMScheduler", clip_sample=False))
    steps = call["num_inference_steps"]
    plan = methods.fora(pipe, steps, interval=2)
    units = list(plan.units)
    index = next(i for i, name in enumerate(units) if name.startswith("up.") and plan.schedule[1][i] == "R")
    following = pipe.unet.up_blocks[int(units[index].split(".")[1]) + 1]
    computed = []
    with diffaccel.accelerate(pipe, plan) as executor:
        unit = executor.units[index].module
        record = unit.register_forward_hook(lambda m, a, out: computed.append(
            (executor.current_step, out.clone() if torch.is_tensor(out) else out[0].clone())))
        def in_place(module, args, kwargs):  # what FreeU does to the next up block's input
            (args[0] if args else kwargs["hidden_states"]).mul_(1.5)

        scale = following.register_forward_pre_hook(in_place, with_kwargs=True)
        run(pipe, call)
        cache = executor._states[0].caches[index]
        last = cache.last()
        record.remove()
        scale.remove()
    last_computed = [value for step, value in computed if plan.schedule[step][index] == "C"][-1]
    assert torch.equal(last if torch.is_tensor(last) else last[0], last_computed)
    assert untouched(pipe)


def test_controlnet_style_conditioning_that_changes_every_step_stops_parallel_decoding():
    """Faster Diffusion batches decoder-only steps ahead; conditioning that changes at every step (a
    ControlNet's residuals) threw them away and recomputed them, while the MACs counted a saving."""
    pipe, call = stable_diffusion(sd_scheduler("DDIMScheduler", clip_sample=False))
    steps = call["num_inference_steps"]

    def jitter(pipe_, index, timestep, kwargs):
        kwargs["prompt_embeds"] = kwargs["prompt_embeds"] * 1.001
        return kwargs

    changing = {**call, "callback_on_step_end": jitter, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}
    stats = {}
    for parallel in (True, False):
        plan = methods.faster_diffusion(pipe, steps, interval=3, parallel=parallel)
        with diffaccel.accelerate(pipe, plan) as executor:
            run(pipe, changing)
        stats[parallel] = executor.stats
    assert stats[True].full_macs == stats[False].full_macs  # the unaccelerated run's cost, whatever was batched
    assert stats[True].macs <= stats[False].macs + stats[False].full_macs / steps  # at most one batch wasted


def test_a_pipeline_run_that_stops_before_the_plan_ends_warns():
    pipe, call = sdxl()
    steps = call["num_inference_steps"]
    with pytest.warns(PlanWarning, match=f"stopped after {steps // 2} of the plan's {steps} steps"):
        with diffaccel.accelerate(pipe, methods.fora(pipe, steps, interval=2)):
            pipe(**call, denoising_end=0.5, output_type="latent")


@pytest.mark.parametrize("strength, evaluations", [(0.75, 7), (0.9, 8)])
def test_an_image_to_image_call_under_pndm_starts_at_the_right_one_of_its_twice_evaluated_timestep(
        strength, evaluations):
    """PNDM's 8-step schedule evaluates t = 751 twice ([876, 751, 751, 626, ...]) and keeps no begin
    index: a run sliced from either 751 sees 751 first. The first had always been taken, so at strength
    0.75 (7 evaluations) a plan made on the call was refused and an 8-step plan ran misaligned."""
    pipe, call = CASES["sd-pndm"][0]()
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def run():
        return i2i(prompt=call["prompt"], image=image, strength=strength, num_inference_steps=8, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images

    plain = run()
    with diffaccel.accelerate(i2i, methods.fora(pipe, evaluations, interval=1)) as full:
        assert torch.equal(run(), plain) and full.stats.steps == evaluations
    for wrong in (evaluations - 1, evaluations + 1):
        with pytest.raises(PlanError, match=f"runs {evaluations} .*make the plan for {evaluations} steps"):
            with diffaccel.accelerate(i2i, methods.fora(pipe, wrong, interval=2)):
                run()
    assert torch.equal(run(), plain)

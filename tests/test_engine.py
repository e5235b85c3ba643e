"""The executor on the embedded pipelines' architectures (random weights, tiny configs)."""

import json
import random
import re

import pytest
import torch

import diffaccel
from diffaccel import methods
from diffaccel.calibration.reference import identity_plan
from diffaccel.errors import MethodError
from diffaccel.plan import Plan, PlanError
from diffaccel.runtime import CacheError
from diffaccel.runtime.cache import UnitCache
from diffaccel.runtime.executor import Executor
from diffaccel.solvers import SolverSpec
from diffaccel.zoo.models import build_dit, build_unet, make_scheduler
from diffaccel.zoo.pipeline import ShapesDiTPipeline, ShapesUNetPipeline


def make_pipes(sampler: str = "ddim"):
    torch.manual_seed(0)
    dit = build_dit(num_layers=4, num_attention_heads=2, attention_head_dim=16).eval()
    unet, embedder = build_unet(block_out_channels=(16, 16, 16), cross_attention_dim=16)
    embedder.register_to_config(dim=16)
    dit_pipe = ShapesDiTPipeline(dit, make_scheduler(sampler))
    unet_pipe = ShapesUNetPipeline(unet.eval(), embedder.eval(), make_scheduler(sampler))
    for pipe in (dit_pipe, unet_pipe):
        pipe.set_progress_bar_config(disable=True)
    return dit_pipe, unet_pipe


@pytest.fixture(scope="module")
def pipes():
    return make_pipes()


def call(pipe, labels=(0, 1, 2), steps=6, guidance=3.0, seed=0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    return pipe(list(labels), num_inference_steps=steps, guidance_scale=guidance, generator=gens).images


def untouched(model: torch.nn.Module) -> bool:
    return all("forward" not in vars(m) and "_diffaccel_executor" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("which", [0, 1])
def test_all_compute_plan_is_bitwise_identical(pipes, which):
    pipe = pipes[which]
    base = call(pipe)
    with diffaccel.accelerate(pipe, methods.fora(pipe.denoiser, 6, interval=1)) as run:
        out = call(pipe)
    assert torch.equal(out, base)
    assert run.stats.reused == 0 and run.stats.macs == run.stats.full_macs
    assert untouched(pipe.denoiser) and torch.equal(call(pipe), base)


def plans_for(pipe, steps):
    model = pipe.denoiser
    if isinstance(pipe, ShapesDiTPipeline):
        return [methods.fora(model, steps, 2), methods.taylorseer(model, steps, 2, order=2, warmup=2),
                methods.fora(model, steps, 2, granularity="component", components=("ff",)),
                methods.first_block_cache(model, threshold=10.0, warmup=1, max_consecutive=2)]
    return [methods.deepcache(model, steps, 2, branch=1), methods.deepcache(model, steps, 3, uniform=False),
            methods.faster_diffusion(model, steps, 2, warmup=1, parallel=True),
            methods.faster_diffusion(model, steps, 2, warmup=1, parallel=False, noise_strength=0.01)]


@pytest.mark.parametrize("which", [0, 1])
def test_plans_that_reuse_work_run_fewer_macs_counted_like_torch(pipes, which):
    from diffaccel.eval.cost import count_macs

    pipe = pipes[which]
    base = call(pipe)
    for plan in plans_for(pipe, 6):
        with diffaccel.accelerate(pipe, plan) as run:
            out = call(pipe)
            stats = run.stats
            counted = count_macs(lambda: call(pipe))
        assert torch.isfinite(out).all() and not torch.equal(out, base), plan.method
        assert stats.reused + stats.forecast > 0 and stats.macs < stats.full_macs, plan.method
        assert abs(counted - stats.macs) <= 0.02 * counted, (plan.method, counted, stats.macs)
        assert untouched(pipe.denoiser)


def test_later_accelerate_blocks_reuse_the_measured_macs_instead_of_counting_flops_again(pipes, monkeypatch):
    pipe = pipes[0]
    plan = methods.fora(pipe.denoiser, 6, interval=2)
    with diffaccel.accelerate(pipe, plan) as first:
        call(pipe)
    monkeypatch.setattr(Executor, "_measured", lambda *_: pytest.fail("FLOPs counted again"))
    with diffaccel.accelerate(pipe, plan) as second:
        call(pipe)
    assert (second.stats.macs, second.stats.full_macs) == (first.stats.macs, first.stats.full_macs)


def test_parallel_decoding_matches_sequential_decoding(pipes):
    pipe = pipes[1]
    outs = []
    for parallel in (False, True):
        plan = methods.faster_diffusion(pipe.denoiser, 8, interval=3, warmup=2, parallel=parallel)
        with diffaccel.accelerate(pipe, plan) as run:
            outs.append(call(pipe, steps=8))
        assert run.stats.forwards == 8
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_no_state_leaks_across_a_random_sequence_of_calls():
    dit_pipe, unet_pipe = make_pipes()
    rng = random.Random(0)
    fresh_dit, fresh_unet = make_pipes()
    for _ in range(10):
        pipe, fresh = rng.choice([(dit_pipe, fresh_dit), (unet_pipe, fresh_unet)])
        steps = rng.choice([4, 6])
        labels = tuple(rng.randrange(6) for _ in range(rng.choice([1, 2, 3])))
        guidance = rng.choice([1.0, 3.0])
        plan = rng.choice(plans_for(pipe, steps) + [None])
        kwargs = dict(labels=labels, steps=steps, guidance=guidance, seed=rng.randrange(100))
        if plan is None:
            got = call(pipe, **kwargs)
            want = call(fresh, **kwargs)
        else:
            with diffaccel.accelerate(pipe, plan):
                got = call(pipe, **kwargs)
            with diffaccel.accelerate(fresh, plan):
                want = call(fresh, **kwargs)
        assert torch.equal(got, want)


def test_one_executor_over_many_calls_keeps_no_state_between_them():
    pipe, _ = make_pipes()
    fresh, _ = make_pipes()
    rule = methods.first_block_cache(pipe.denoiser, threshold=10.0, warmup=1, max_consecutive=2)
    rng = random.Random(1)
    diffaccel.enable(pipe, rule)
    try:
        for _ in range(8):
            kwargs = dict(labels=tuple(rng.randrange(6) for _ in range(rng.choice([1, 3]))),
                          steps=rng.choice([3, 5, 7]), guidance=rng.choice([1.0, 4.0]), seed=rng.randrange(50))
            got = call(pipe, **kwargs)
            with diffaccel.accelerate(fresh, rule):
                want = call(fresh, **kwargs)
            assert torch.equal(got, want)
    finally:
        diffaccel.disable(pipe)
    assert untouched(pipe.denoiser)


def test_model_is_restored_after_an_exception_inside_the_context(pipes):
    pipe = pipes[0]
    base = call(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with diffaccel.accelerate(pipe, methods.fora(pipe.denoiser, 6, 2)):
            call(pipe)
            raise RuntimeError("boom")
    assert untouched(pipe.denoiser)
    assert "set_timesteps" not in vars(pipe.scheduler) and "step" not in vars(pipe.scheduler)
    assert torch.equal(call(pipe), base)
    with diffaccel.accelerate(pipe, methods.fora(pipe.denoiser, 6, 2)):  # a second plan inside: refused, not stacked
        with pytest.raises(PlanError, match=r"plans do not nest\): leave its `accelerate` block"):
            with diffaccel.accelerate(pipe, methods.fora(pipe.denoiser, 6, 3)):
                pass
    assert untouched(pipe.denoiser) and torch.equal(call(pipe), base)


def test_plan_for_another_model_is_refused(pipes):
    dit_pipe, unet_pipe = pipes
    with pytest.raises(PlanError, match="made for the 'unet' adapter"):
        diffaccel.enable(dit_pipe, methods.deepcache(unet_pipe.denoiser, 6))
    other = build_dit(num_layers=3, num_attention_heads=2, attention_head_dim=16)
    with pytest.raises(PlanError, match="units do not match"):
        diffaccel.enable(dit_pipe, methods.fora(other, 6))
    assert untouched(dit_pipe.denoiser)


def test_a_plan_file_path_is_read_and_anything_else_is_refused(pipes, tmp_path):
    pipe = pipes[0]
    plan = methods.fora(pipe.denoiser, 6, 2)
    plan.save(tmp_path / "plan.json")
    with diffaccel.accelerate(pipe, methods.fora(pipe.denoiser, 6, 2)):
        expected = call(pipe)
    with diffaccel.accelerate(pipe, str(tmp_path / "plan.json")):
        assert torch.equal(call(pipe), expected)
    for bad in ({"schedule": ["C"]}, None):
        with pytest.raises(PlanError, match="must be a diffaccel Plan"):
            diffaccel.accelerate(pipe, bad).__enter__()
    assert untouched(pipe.denoiser)


def test_hand_edited_plan_fields_are_refused_at_load_or_before_they_serve_a_value(pipes):
    pipe = pipes[0]
    plan = methods.fora(pipe.denoiser, 6, interval=2)
    base = plan.model_dump()
    for edit, message in (({"num_steps": "6"}, "whole number"), ({"step_scale": [1, 1, -1, 1, 1, 1]}, "positive"),
                          ({"timesteps": [1, 2, 3, 4, 5, 6]}, "must not increase"),
                          ({"correction": {"gain": [1.0] * 6, "bias": [[0.0]] * 2}}, "one row per step")):
        with pytest.raises(PlanError, match=message):
            Plan.from_dict({**base, **edit})
    wrong_width = Plan.from_dict({**base, "correction": {"gain": [1.0] * 6, "bias": [[5.0] * 3] * 6}})
    with pytest.raises(PlanError, match="correction.bias has 3 values per step.*another model"):
        with diffaccel.accelerate(pipe, wrong_width):
            call(pipe)  # was served without the bias, silently
    assert untouched(pipe.denoiser)
    with pytest.raises(PlanError, match="JSON text, not a path"):
        diffaccel.accelerate(pipe, plan.to_json()).__enter__()


def test_a_method_given_bad_steps_or_settings_says_what_to_fix(pipes):
    pipe = pipes[0]
    for steps, message in (("6", "whole number"), (6.0, "whole number"), (True, "whole number"), (0, ">= 1")):
        with pytest.raises(MethodError, match=message):
            methods.fora(pipe, num_steps=steps, interval=2)
    with pytest.raises(MethodError, match="interval: Input should be greater than or equal to 1"):
        methods.fora(pipe, num_steps=6, interval=0)
    with pytest.raises(MethodError, match="fora has no setting intervall"):
        methods.fora(pipe, num_steps=6, intervall=2)
    units = len(methods.fora(pipe, num_steps=6, interval=2).units)
    with pytest.raises(MethodError, match="makes no valid plan .*leave units to skip"):
        methods.first_block_cache(pipe, first_blocks=units)  # was pydantic's ValidationError
    with pytest.raises(MethodError, match="no unit is a component named zzz; this model's are"):
        methods.fora(pipe, num_steps=6, interval=2, granularity="component", components=("zzz",))
    with pytest.raises(MethodError, match="with granularity 'component'"):
        methods.fora(pipe, num_steps=6, interval=2, components=("ff",))  # was ignored
    with pytest.raises(MethodError, match="takes a caching plan"):
        methods.ptq(pipe, None, cache={"method": "keysteps", "keys": 3})


def test_plan_with_the_wrong_number_of_steps_is_refused_before_running(pipes):
    pipe = pipes[0]
    base = call(pipe, steps=5)
    with diffaccel.accelerate(pipe, methods.fora(pipe.denoiser, 6, 2)):
        with pytest.raises(PlanError, match="plan is for 6 steps but the pipeline runs 5"):
            call(pipe, steps=5)
    assert untouched(pipe.denoiser) and torch.equal(call(pipe, steps=5), base)


def test_bad_plan_files_are_rejected_with_what_is_wrong(pipes, tmp_path):
    good = methods.fora(pipes[0].denoiser, 6, 2)
    path = good.save(tmp_path / "plan.json")
    assert Plan.load(path) == good
    text = path.read_text()
    cases = {
        "truncated.json": (text[: len(text) // 2], "not valid JSON"),
        "list.json": ("[1, 2]", "must hold a JSON object"),
        "version.json": (json.dumps({**json.loads(text), "version": 9}), "version 9"),
        "action.json": (text.replace('"CCCC"', '"CXCC"', 1), "unknown action 'X'"),
        "steps.json": (json.dumps({**json.loads(text), "num_steps": 7}), "schedule has 6 steps but num_steps is 7"),
        "extra.json": (json.dumps({**json.loads(text), "turbo": True}), "turbo"),
        "first.json": (text.replace('"CCCC"', '"RRRR"', 1), "first step must compute"),
        "other.json": (json.dumps({"model": "dit", "psnr": 30}), "is not an image plan file .*its fields: model, psnr"),
        "nan.json": (text.replace('"method"', '"step_scale": [NaN, 1, 1, 1, 1, 1], "method"', 1),
                     "step_scale.0: Input should be a finite number"),
        "inf.json": (json.dumps({**json.loads(text), "correction": {"gain": [1e999] * 6, "bias": []}}),
                     "correction.gain.0: Input should be a finite number"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(PlanError, match=message):
            Plan.load(tmp_path / name)
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    with pytest.raises(PlanError, match="is a folder: give the plan file in it"):
        Plan.load(tmp_path)
    assert Plan.load(good.save(tmp_path / "new" / "folder" / "plan.json")) == good  # the folders are made
    unsaved = good.model_copy(update={"num_steps": 7})  # model_copy does not validate; save does
    with pytest.raises(PlanError, match="schedule has 6 steps but num_steps is 7"):
        unsaved.save(tmp_path / "unsaved.json")
    assert not (tmp_path / "unsaved.json").exists()
    lm_plan = tmp_path / "lm.json"
    lm_plan.write_text(json.dumps({"version": 1, "kind": "dlm", "method": "none"}))
    with pytest.raises(PlanError, match=r"an LM plan file, not an image plan file: read it with "
                                        r"diffaccel.LMPlan.load \(command line: --model dlm --plan\)"):
        Plan.load(lm_plan)


def test_nan_in_a_cached_tensor_is_reported_and_the_model_left_untouched(pipes):
    pipe = pipes[0]
    base = call(pipe)
    for module, value, where in ((pipe.denoiser.transformer_blocks[2].ff, float("nan"), "unit blocks.2"),
                                 (pipe.denoiser.proj_out_2, float("inf"), "the model")):  # proj_out_2: in no unit
        handle = module.register_forward_hook(lambda m, a, out, v=value: out * v)
        try:
            with pytest.raises(CacheError, match=f"{where} produced a non-finite value at step 0"):
                with diffaccel.accelerate(pipe, methods.fora(pipe.denoiser, 6, 2)):
                    call(pipe)
        finally:
            handle.remove()
        assert untouched(pipe.denoiser) and torch.equal(call(pipe), base)


def test_dpm_solver_and_changing_step_counts_with_a_rule(pipes):
    dit_pipe, _ = make_pipes("dpm")
    rule = methods.first_block_cache(dit_pipe.denoiser, threshold=10.0, warmup=1)
    with diffaccel.accelerate(dit_pipe, rule) as run:
        for steps in (4, 9):
            out = call(dit_pipe, steps=steps)
            assert torch.isfinite(out).all()
            assert run.stats.forwards == steps and run.stats.reused > 0


def test_plan_show_prints_the_map(pipes, monkeypatch):
    from diffaccel.report import plan_view

    plan = methods.deepcache(pipes[1].denoiser, 6, 3)
    monkeypatch.setattr(plan_view, "shipped_unit_macs", lambda p, m: [("unet", [100] + [10] * len(p.units))])
    text = plan_view.render_plan(plan)
    rows = [line.split()[1] for line in text.splitlines() if re.fullmatch(r"\s+\d+ [#.~]+", line)]
    assert rows == [r.replace("C", "#").replace("R", ".") for r in plan.schedule]
    assert "MACs: 66.7% of the full model" in text
    rule_text = plan_view.render_plan(methods.first_block_cache(pipes[0].denoiser, 0.2))
    assert "decided at run time" in rule_text
    whole = identity_plan(pipes[0].denoiser).model_copy(update={"precision": "bfloat16"})  # no schedule, no rule
    text = plan_view.render_plan(whole)
    assert "every unit computes at every step" in text and "autocast to bfloat16" in text
    text = plan_view.render_plan(plan.model_copy(update={"solver": SolverSpec(name="unipc", steps=6)}))
    assert "sampler: unipc 6" in text and "6 evaluations of that sampler" in text
    assert "any number of steps" in plan_view.render_plan(whole)
    solver_only = whole.model_copy(update={"solver": SolverSpec(name="unipc", steps=6)})
    assert "its solver's 6, whatever the pipeline is called with" in plan_view.render_plan(solver_only)


def test_guidance_branches_called_separately_keep_separate_caches():
    """A sampler that calls the model twice per step (conditional, then unconditional) must get
    one cache per branch: each branch then matches that branch run alone."""
    pipe, _ = make_pipes()
    model = pipe.denoiser
    plan = methods.fora(model, 5, 2)
    x0 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    times = [900, 700, 500, 300, 100]

    def loop(labels_per_call):
        xs = [x0.clone() for _ in labels_per_call]
        outs = []
        for t in times:
            for i, labels in enumerate(labels_per_call):
                out = model(xs[i], timestep=torch.full((2,), t), class_labels=labels).sample
                xs[i] = xs[i] - 0.1 * out
                outs.append(out)
        return xs

    cond, uncond = torch.tensor([1, 2]), torch.tensor([6, 6])
    with diffaccel.accelerate(model, plan):
        both = loop([cond, uncond])
    with diffaccel.accelerate(model, plan):
        (only_cond,) = loop([cond])
    with diffaccel.accelerate(model, plan):
        (only_uncond,) = loop([uncond])
    assert torch.equal(both[0], only_cond) and torch.equal(both[1], only_uncond)


def test_erta_profiles_calibration_runs_and_fits_corrections(pipes):
    from diffaccel.methods.erta import erta

    pipe = pipes[0]
    calls = pipe.workload_calls(num_steps=8, per_class=1, classes=[0, 1])
    plan = erta(pipe, calls, threshold=0.3, warmup=2, adjust_steps=True)
    assert len(plan.params["profile"]) == 8 and plan.calibration.images == 2 and plan.calibration.steps == 8
    assert plan.correction is not None and len(plan.correction.gain) == 8
    assert plan.step_scale is not None and all(0.8 <= s <= 1.2 for s in plan.step_scale)
    reused = [i for i, row in enumerate(plan.schedule) if "R" in row]
    assert reused and all(plan.step_scale[i] == 1.0 for i in range(8) if i not in reused)
    with diffaccel.accelerate(pipe, plan) as run:
        out = call(pipe, steps=8)
    assert torch.isfinite(out).all() and run.stats.macs < run.stats.full_macs
    assert Plan.from_dict(json.loads(plan.to_json())) == plan
    with pytest.raises(PlanError, match="pass the pipeline"):
        diffaccel.enable(pipe.denoiser, plan)
    assert untouched(pipe.denoiser)


def test_taylor_forecast_is_exact_for_polynomials_of_its_order():
    from diffaccel.runtime.cache import UnitCache

    cache = UnitCache()
    for step in (2, 6, 10):  # uneven gaps, nested outputs as U-Net down blocks return them
        cache.store(step, (torch.tensor([step**2.0]), (torch.tensor([3.0 * step + 1]),)), keep=3)
    square, (line,) = cache.forecast(11, order=2)
    assert square.item() == pytest.approx(121.0) and line.item() == pytest.approx(34.0)
    assert cache.forecast(11, order=1)[1][0].item() == pytest.approx(34.0)
    assert cache.forecast(11, order=1)[0].item() == pytest.approx(100 + 16)  # the line through 6 and 10


# -- per-channel correction of cached features ------------------------------------------------------------
def test_feature_correction_fits_every_reused_unit_and_identity_changes_nothing(pipes, tmp_path):
    from diffaccel.methods.feature_correction import GAIN_RANGE, fit_feature_correction
    from diffaccel.plan import FeatureCorrection, FeatureFit

    pipe = pipes[0]
    plan = methods.fora(pipe.denoiser, 6, interval=3)
    fitted = fit_feature_correction(pipe, plan, pipe.workload_calls(num_steps=6, per_class=1))
    reused = {(s, u) for s, row in enumerate(plan.schedule) for u, a in zip(plan.units, row) if a != "C"}
    fits = fitted.feature_correction.fits
    assert {(f.step, f.unit) for f in fits} == reused and fitted.feature_correction.axis == -1
    width = pipe.denoiser.config.num_attention_heads * pipe.denoiser.config.attention_head_dim
    assert all(len(f.gain) == width and not f.bias for f in fits)
    assert all(GAIN_RANGE[0] <= g <= GAIN_RANGE[1] for f in fits for g in f.gain)
    assert any(g != 1.0 for f in fits for g in f.gain)
    fitted.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == fitted
    with diffaccel.accelerate(pipe, plan):
        plain = call(pipe)
    identity = plan.model_copy(update={"feature_correction": FeatureCorrection(
        axis=-1, fits=[FeatureFit(step=f.step, unit=f.unit, gain=[1.0] * width) for f in fits])})
    with diffaccel.accelerate(pipe, identity):
        assert torch.allclose(call(pipe), plain, atol=1e-6)  # per-unit path vs merged runs: same sums
    with diffaccel.accelerate(pipe, fitted):
        corrected = call(pipe)
    assert torch.isfinite(corrected).all() and not torch.equal(corrected, plain)


def test_feature_correction_rejects_fits_the_plan_cannot_hold(pipes):
    from diffaccel.plan import FeatureCorrection, FeatureFit

    plan = methods.fora(pipes[0].denoiser, 6, interval=3)
    unit = plan.units[1]
    for fit, fragment in ((FeatureFit(step=0, unit=unit, gain=[1.0]), "computes"),
                          (FeatureFit(step=1, unit="nowhere", gain=[1.0]), "does not have"),
                          (FeatureFit(step=9, unit=unit, gain=[1.0]), "does not have")):
        with pytest.raises(ValueError, match=fragment):
            Plan.model_validate({**plan.model_dump(), "feature_correction": {"axis": -1, "fits": [fit.model_dump()]}})
    for bad in ({"gain": [1.0, 2.0], "bias": [0.0]}, {"gain": [float("nan")]}):
        with pytest.raises(ValueError):
            FeatureFit(step=1, unit=unit, **bad)
    assert FeatureCorrection(axis=1).fits == []


def test_only_the_units_a_plan_serves_keep_their_outputs(pipes, monkeypatch):
    pipe = pipes[0]
    stored = []
    monkeypatch.setattr(UnitCache, "store", lambda self, step, value, keep: stored.append(step))
    whole, fora = identity_plan(pipe.denoiser), methods.fora(pipe.denoiser, 6, 2)
    assert whole.served_units() == frozenset() and fora.served_units()
    with diffaccel.accelerate(pipe, whole):
        call(pipe)
    assert stored == []  # nothing is ever served: nothing kept
    with diffaccel.accelerate(pipe, fora):
        call(pipe)
    assert len(stored) >= len(fora.served_units())


def test_nan_under_an_all_compute_plan_names_its_unit(pipes):
    pipe = pipes[0]
    handle = pipe.denoiser.transformer_blocks[2].ff.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        with pytest.raises(CacheError, match="unit blocks.2 produced a non-finite value at step 0"):
            with diffaccel.accelerate(pipe, identity_plan(pipe.denoiser)):  # nothing cached, still named
                call(pipe)
    finally:
        handle.remove()
    assert untouched(pipe.denoiser)


def test_plan_files_are_utf8_tolerate_a_bom_and_refuse_converted_json_types(pipes, tmp_path):
    plan = methods.fora(pipes[0], 10, interval=2)
    data = json.loads(plan.to_json())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())
    assert Plan.load(tmp_path / "bom.json") == plan  # had been "Unexpected UTF-8 BOM (decode using utf-8-sig)"
    named = plan.model_copy(update={"params": {"note": "café"}})
    assert Plan.load(named.save(tmp_path / "named.json")) == named
    assert "café".encode() in (tmp_path / "named.json").read_bytes()  # UTF-8 whatever the locale's encoding
    for field, value, fragment in [("parallel_decode", "yes", 'parallel_decode must be true or false, not "yes"'),
                                   ("forecast_order", True, "forecast_order must be a whole number, not true"),
                                   ("forecast_order", "2", 'forecast_order must be a whole number, not "2"'),
                                   ("version", True, "version True"),
                                   ("noise_injection", {"from_step": 50}, "past the plan's 10 steps"),
                                   ("step_scale", [1e30] * 10, "step_scale values must be positive and at most 100"),
                                   ("correction", {"gain": [1e30] * 10}, "each within +-100")]:
        (tmp_path / "bad.json").write_text(json.dumps({**data, field: value}))
        with pytest.raises(PlanError, match=re.escape(fragment)):
            Plan.load(tmp_path / "bad.json")  # each had been converted (true -> 1, "yes" -> True) or accepted


def test_a_failed_save_of_a_quantized_plan_leaves_the_earlier_plan_and_its_calibration(tmp_path):
    from safetensors.torch import save_file

    from diffaccel.quant import QuantSpec

    plan = identity_plan(build_dit(), "block")
    for name, value in (("old", 0.0), ("new", 1.0)):
        save_file({"x": torch.full((2,), value)}, str(tmp_path / f"{name}.safetensors"))
    old = plan.with_quant(QuantSpec(calibration=str(tmp_path / "old.safetensors")))
    old.save(tmp_path / "out" / "plan.json")
    before = (tmp_path / "out" / "plan.calibration.safetensors").read_bytes()
    (tmp_path / "out" / "plan.json.tmp").mkdir()  # the plan's own write fails
    new = plan.with_quant(QuantSpec(calibration=str(tmp_path / "new.safetensors")))
    with pytest.raises(OSError):
        new.save(tmp_path / "out" / "plan.json")
    assert (tmp_path / "out" / "plan.calibration.safetensors").read_bytes() == before  # had been the new plan's
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plan.calibration.safetensors", "plan.json",
                                                                     "plan.json.tmp"]


def test_a_guidance_scale_too_large_for_the_dtype_is_named_among_the_causes_of_a_non_finite_output(pipes):
    """``--guidance 1e30`` ended in "the model, its input or the plan's correction or scale values are
    broken": guidance was not among the causes named."""
    pipe = pipes[0]
    with pytest.raises(CacheError, match="non-finite value .*a guidance scale too large"):
        with diffaccel.accelerate(pipe, identity_plan(pipe.denoiser)):
            call(pipe, guidance=1e38)
    assert untouched(pipe.denoiser)

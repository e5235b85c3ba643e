"""The predicted unconditional guidance branch: its plan section, the executor's half-batch steps on
stock diffusers pipelines, its fit, and its place in the joint search."""

from __future__ import annotations

import json

import pytest
import torch

import diffaccel
from conftest import requires_weights, run_cli
from diffaccel.calibration.reference import CalibrationRun, identity_plan
from diffaccel.errors import MethodError, PlanError
from diffaccel.methods import fit_guidance, fora
from diffaccel.methods.guidance import unconditional_half
from diffaccel.plan import Plan
from diffaccel.search.candidates import Candidate
from diffaccel.search.config import parse_budget
from diffaccel.search.joint import JointSearch
from diffaccel.solvers import SolverSpec
from diffaccel.zoo.pipeline import shapes_workload
from diffaccel.zoo.weights import load_pipeline
from stock_pipelines import build as build_case
from test_engine import call, make_pipes, untouched

STEPS = 4


def guided_plan(model: torch.nn.Module, steps: dict[int, list[float]], half: str = "first", base: Plan | None = None):
    plan = base or identity_plan(model)
    section = {"unconditional": half, "steps": [{"step": s, "weights": w} for s, w in sorted(steps.items())]}
    return Plan.model_validate({**plan.model_dump(), "guidance": section})


def by_hand(model: torch.nn.Module, last: int, uncond_first: bool, replace):
    """Run the model in full, and at step ``last`` overwrite the unconditional half of its output by
    ``replace(cond, previous_uncond)``: what a predicted step must give, computed the long way."""
    seen = {"n": 0, "previous": None}
    forward = model.forward

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        sample = out.sample if hasattr(out, "sample") else out[0]
        first, second = sample.chunk(2)
        uncond, cond = (first, second) if uncond_first else (second, first)
        if seen["n"] % STEPS == last:
            uncond = replace(cond, seen["previous"])
        seen["previous"], seen["n"] = uncond, seen["n"] + 1
        both = torch.cat([uncond, cond] if uncond_first else [cond, uncond])
        return type(out)(sample=both) if hasattr(out, "sample") else (both,)

    return patched


def batches(model: torch.nn.Module) -> tuple[list[int], object]:
    """The batch size of each forward, as the model's input layer sees it (past the executor)."""
    seen: list[int] = []
    first = model.conv_in if hasattr(model, "conv_in") else model.pos_embed
    return seen, first.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))


@pytest.mark.parametrize("case", ["sd-dpm-multistep", "dit"])
@pytest.mark.parametrize("weights,replace", [([1.0, 0, 0, 0, 0], lambda cond, prev: cond),
                                             ([0, 0, 1.0, 0, 0], lambda cond, prev: prev)])
def test_a_predicted_step_runs_the_conditional_half_only_and_gives_the_weighted_terms(case, weights, replace):
    pipe, kwargs = build_case(case)
    kwargs = {**kwargs, "num_inference_steps": STEPS}
    model, _ = diffaccel.adapters.find_denoiser(pipe)
    half = unconditional_half(pipe)
    assert half == ("second" if case == "dit" else "first")  # DiTPipeline puts the conditional branch first

    def run(**extra):
        return pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt", **extra).images

    model.forward = by_hand(model, STEPS - 1, half == "first", replace)
    try:
        expected = run()
    finally:
        del model.forward
    seen, handle = batches(model)
    try:
        with diffaccel.accelerate(pipe, guided_plan(model, {STEPS - 1: weights}, half)) as accelerated:
            got = run()
    finally:
        handle.remove()
    assert seen[-1] * 2 == seen[0] and len(set(seen[:-1])) == 1  # the last step ran half the batch
    assert torch.allclose(torch.as_tensor(got), torch.as_tensor(expected), atol=1e-5)
    stats = accelerated.stats
    assert stats.macs / stats.full_macs == pytest.approx((STEPS - 0.5) / STEPS)
    assert untouched(model)


def test_the_predicted_step_sees_the_conditional_inputs():
    pipe, kwargs = build_case("dit")
    model = pipe.transformer
    labels: list[torch.Tensor] = []
    norm = model.transformer_blocks[0].norm1  # the class labels reach it past the executor
    handle = norm.register_forward_pre_hook(
        lambda m, a, k: labels.append((a[2] if len(a) > 2 else k["class_labels"]).clone()), with_kwargs=True)
    try:
        with diffaccel.accelerate(pipe, guided_plan(model, {STEPS - 1: [1.0, 0, 0, 0, 0]}, "second")):
            pipe(**{**kwargs, "num_inference_steps": STEPS}, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert labels[-1].tolist() == kwargs["class_labels"] and 1000 in labels[0].tolist()


def test_bad_guidance_sections_are_refused_with_what_to_fix():
    dit, _ = make_pipes()
    model = dit.denoiser
    with pytest.raises(ValueError, match="needs 5 weights"):
        guided_plan(model, {2: [1.0, 0.0]})
    with pytest.raises(ValueError, match="needs 2 weights"):
        guided_plan(model, {0: [1.0] * 5})
    with pytest.raises(ValueError, match="finite"):
        guided_plan(model, {1: [float("nan")] * 5})
    cached = fora(model, 6, interval=2)  # step 5 reuses units
    with pytest.raises(ValueError, match="computes every unit"):
        guided_plan(model, {5: [1.0] * 5}, base=cached)
    with pytest.raises(ValueError, match="the plan has 6 steps"):
        guided_plan(model, {6: [1.0] * 5}, base=fora(model, 6, interval=1))
    with pytest.raises(PlanError, match="fit it again for 8 steps"):
        guided_plan(model, {4: [1.0] * 5}, base=fora(model, 6, interval=2)).resample(8)


def test_a_run_without_guidance_is_refused_and_the_model_left_as_it_was():
    dit, _ = make_pipes()
    with pytest.raises(PlanError, match="guidance_scale > 1"):
        with diffaccel.accelerate(dit, guided_plan(dit.denoiser, {5: [1.0] * 5})):
            call(dit, labels=(0, 1), guidance=1.0)
    assert untouched(dit.denoiser)


def test_a_pipeline_that_runs_its_guidance_branches_as_separate_calls_is_refused():
    pipe, kwargs = build_case("user-pipeline")  # a user's own pipeline: two model calls per step
    model = pipe.backbone
    with pytest.raises(PlanError, match="one doubled batch"):
        with diffaccel.accelerate(pipe, guided_plan(model, {5: [1.0] * 5})):
            pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    assert untouched(model)


def test_the_fit_predicts_the_unconditional_branch_better_than_copying_the_conditional_one():
    dit, _ = make_pipes()
    work = shapes_workload([0, 1, 2], 6, per_class=1)
    plan = fit_guidance(dit, identity_plan(dit.denoiser), [5], work)
    assert plan.guidance.unconditional == "first" and [s.step for s in plan.guidance.steps] == [5]
    reference = work(dit)

    def error(candidate: Plan) -> float:
        with diffaccel.accelerate(dit, candidate):
            return float((work(dit) - reference).pow(2).mean())

    fitted, copied = error(plan), error(guided_plan(dit.denoiser, {5: [1.0, 0, 0, 0, 0]}))
    assert 0 < fitted < copied
    with pytest.raises(MethodError, match="at least one step"):
        fit_guidance(dit, identity_plan(dit.denoiser), [], work)
    with pytest.raises(MethodError, match=r"^invalid guidance prediction at steps \[5\] of this plan: guidance "
                       r"predicts step 5, where the schedule reuses units: a step that runs half the batch computes "
                       r"every unit$"):  # one line, no pydantic dump
        fit_guidance(dit, fora(dit.denoiser, 6, interval=2), [5], work)
    assert untouched(dit.denoiser)


def test_the_joint_search_predicts_guidance_from_the_last_step_back_while_the_budget_holds():
    dit, _ = make_pipes()
    calib = CalibrationRun(dit, shapes_workload([0, 1], 6, per_class=1))
    lines: list[str] = []
    joint = JointSearch(calib, parse_budget("psnr>=20"), "macs", None, lines.append)
    joint.score(identity_plan(dit.denoiser), "all compute")
    joint.guided()
    guided = [c for c in joint.candidates if "guidance predicted" in c.source]
    assert guided and "at step 5 (0-based" in guided[0].source  # the last step first, numbered as in the plan
    assert guided[0].plan.guidance.steps[0].step == 5
    assert [c.mac_fraction for c in guided] == pytest.approx([1 - k / 12 for k in range(1, len(guided) + 1)])
    assert all(c.meets(joint.budget) for c in guided[:-1])  # each kept step cleared the budget ...
    assert len(guided) == 5 or not guided[-1].meets(joint.budget)  # ... and the phase stops at the first miss
    joint.guided()  # a candidate is tried once
    assert len([c for c in joint.candidates if "guidance predicted" in c.source]) == len(guided)


def test_a_predicted_step_saves_half_a_step_of_macs_and_what_the_half_batch_saves_in_time(monkeypatch):
    dit, _ = make_pipes()
    calib = CalibrationRun(dit, shapes_workload([0, 1], 6, per_class=1))
    forwards = []
    monkeypatch.setattr(calib, "_forward_seconds", lambda args, kwargs, context=None: forwards.append(
        args[0].shape[0] if args else kwargs["hidden_states"].shape[0]) or 0.01 * (2 + forwards[-1]))
    plan = guided_plan(dit.denoiser, {4: [1.0, 0, 0, 0, 0], 5: [1.0, 0, 0, 0, 0]})
    macs, latency = calib.fractions(plan)
    assert calib.half_batch_cost() == pytest.approx(4 / 6)  # a batch of 2: 0.04 s against 0.06 for 4
    assert sorted(set(forwards)) == [2, 4] and len(forwards) == 6  # measured once, interleaved
    assert macs == pytest.approx(1 - 2 * 0.5 / 6) and latency == pytest.approx(1 - 2 * (2 / 6) / 6)
    assert calib.fractions(identity_plan(dit.denoiser)) == (1.0, pytest.approx(1.0)) and len(forwards) == 6
    unguided = CalibrationRun(dit, shapes_workload([0, 1], 6, guidance=1.0, per_class=1))
    assert unguided.half_batch_cost() == 0.5  # an odd or unguided batch: nothing to time


def test_the_guidance_phase_tries_the_best_of_equally_cheap_plans_first(monkeypatch):
    """A sampler's fits cost the same: the prediction spends headroom, so the best ones are tried."""
    dit, _ = make_pipes()
    joint = JointSearch(CalibrationRun(dit, shapes_workload([0], 6, per_class=1)), parse_budget("psnr>=30"), "macs",
                        None, lambda _: None)
    plan = identity_plan(dit.denoiser)
    joint.candidates = [Candidate(None, [], psnr, 25.0, 0.9, cost, cost, name, i, plan=plan)
                        for i, (psnr, cost, name) in enumerate([(30.5, 0.2, "fit"), (31.0, 0.2, "last step"),
                                                                (32.0, 0.2, "every step"), (29.0, 0.1, "misses"),
                                                                (40.0, 0.5, "dear")])]
    tried: list[str] = []
    monkeypatch.setattr(joint, "_predict_back", lambda c: tried.append(c.source))
    joint.guided()
    assert tried == ["every step", "last step"]


@requires_weights
def test_generate_and_plan_show_take_a_guided_plan_from_its_file(monkeypatch, capsys, tmp_path):
    """A fitted guidance plan saved to a file runs through the CLI: 5 steps with the last one's
    unconditional half predicted cost 4.5 of the baseline's 10 steps."""
    pipe = load_pipeline("dit")
    base = identity_plan(pipe.denoiser).model_copy(update={"solver": SolverSpec(name="unipc", steps=5)})
    fitted = fit_guidance(pipe, base, [4], shapes_workload([0, 1], 10, per_class=1))
    fitted.save(tmp_path / "guided.json")
    args = ("generate", "--model", "dit", "--classes", "circle", "--per-class", "2", "--steps", "10",
            "--plan", str(tmp_path / "guided.json"))
    code, out, err = run_cli(monkeypatch, capsys, *args, "--compare", "--out", tmp_path / "compared")
    assert code == 0, out + err
    record = json.loads((tmp_path / "compared" / "record.json").read_text())
    assert record["speedup_macs"] == pytest.approx(10 / 4.5, rel=0.01)
    code, out, _ = run_cli(monkeypatch, capsys, "plan", "show", tmp_path / "guided.json")
    assert code == 0 and "at step 4 the denoiser runs the conditional half" in out


def test_the_search_refits_a_fitted_solver_under_the_prediction_unless_out_of_time():
    dit, _ = make_pipes()
    calib = CalibrationRun(dit, shapes_workload([0, 1], 10, per_class=1))
    spec = SolverSpec(name="unipc", steps=4, coefficients=((0.0,) * 2, (0.0,) * 3, (0.0,) * 4, (0.01,) * 4))
    plan = identity_plan(dit.denoiser).model_copy(update={"solver": spec})
    guided = fit_guidance(dit, plan, [3], calib.calibrate)
    joint = JointSearch(calib, parse_budget("psnr>=20"), "macs", None, lambda _: None)
    refit = joint._refitted(guided)
    assert refit.guidance == guided.guidance and refit.solver.coefficients != spec.coefficients
    assert refit.solver.coefficients[0] == (0.0,) * 2  # a last-step fit stays a last-step fit
    joint._deadline = 0.0  # long past: the plan is scored as it is
    assert joint._refitted(guided) is guided

"""A plan's precision: the denoiser runs under autocast, the rest of the pipeline and the model's
own parameters stay as they are, and removing the plan leaves no trace."""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import replace as dc_replace

import pytest
import torch

import diffaccel
from diffaccel.adapters import find_denoiser
from diffaccel.calibration.record import activation_ranges
from diffaccel.calibration.reference import CalibrationRun, identity_plan
from diffaccel.calibration.workload import as_workload
from diffaccel.errors import PlanError, QuantError, SearchError
from diffaccel.plan import Plan
from diffaccel.quant.layers import QuantizedLayer
from diffaccel.quant.spec import QuantSpec
from diffaccel.runtime.features import precision as precision_feature
from diffaccel.search import search
from diffaccel.search.candidates import Candidate
from diffaccel.search.config import parse_budget
from diffaccel.search.precision import MIN_GAIN, Arithmetic, arithmetic_choices, autocast, lower_precision
from stock_pipelines import build as build_case
from test_pipelines import run, untouched

BF16 = [autocast("bfloat16", torch.device("cpu"))]


def _matmul_dtypes(model: torch.nn.Module) -> tuple[set, list]:
    """Records the dtype each Linear computes in (its output's), through hooks to remove after."""
    seen: set = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return seen, hooks


@pytest.mark.parametrize("name", ["sd-pndm", "dit", "flux", "user-pipeline"])
def test_a_bfloat16_plan_runs_the_denoiser_in_bfloat16_and_leaves_the_pipeline_as_it_was(name):
    pipe, call = build_case(name)
    base = run(pipe, call)
    model, _ = find_denoiser(pipe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = identity_plan(model).model_copy(update={"precision": "bfloat16"})
    seen, hooks = _matmul_dtypes(model)
    try:
        with diffaccel.accelerate(pipe, plan) as executor:
            out = run(pipe, call)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {torch.bfloat16}
    assert out.dtype == base.dtype and not torch.equal(out, base)
    error, other_seed = float((out - base).abs().mean()), float((run(pipe, call, seed=1) - base).abs().mean())
    assert error < 0.25 * other_seed, (error, other_seed)  # bfloat16 rounding, not a broken run
    assert executor.stats.macs == executor.stats.full_macs > 0  # the same work, in another dtype
    assert untouched(pipe) and torch.equal(run(pipe, call), base)
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in model.state_dict().items())


def test_precision_composes_with_caching_and_the_output_keeps_the_samples_dtype():
    pipe, call = build_case("dit")
    model, _ = find_denoiser(pipe)
    plan = diffaccel.methods.fora(pipe, call["num_inference_steps"], interval=2)
    outputs = []
    model.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    with diffaccel.accelerate(pipe, plan.model_copy(update={"precision": "bfloat16"})) as executor:
        run(pipe, call)
    assert executor.stats.macs < executor.stats.full_macs
    assert outputs and all((o.sample if hasattr(o, "sample") else o[0]).dtype == torch.float32 for o in outputs)


@pytest.mark.parametrize("emulated", [True, False])
def test_a_precision_this_cpu_only_emulates_is_warned_about(monkeypatch, emulated):
    """bfloat16 on a CPU without AVX-512 BF16 or AMX runs 20x slower than float32: a user who asks for
    it is told, not left to find out; where it is native, nothing is said."""
    monkeypatch.setattr(precision_feature, "emulated_on_cpu", lambda precision: emulated)
    pipe, call = build_case("dit")
    plan = identity_plan(find_denoiser(pipe)[0]).model_copy(update={"precision": "bfloat16"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with diffaccel.accelerate(pipe, plan):
            run(pipe, call)
    said = [str(w.message) for w in caught if "no native bfloat16" in str(w.message)]
    assert len(said) == (1 if emulated else 0) and all("slower than float32" in line for line in said)


def test_an_unknown_precision_is_refused_with_the_choices():
    pipe, _ = build_case("dit")
    data = identity_plan(find_denoiser(pipe)[0]).model_dump()
    with pytest.raises(PlanError, match="bfloat16"):
        Plan.from_dict({**data, "precision": "int4"})


def _timed(calib: CalibrationRun, speed: float):
    """``calib.score`` with its seconds replaced: a plan with a precision runs ``speed`` times as fast
    (the decision is tested, not this machine's bfloat16 units)."""
    real = calib.score

    def score(plan: Plan):
        s = real(plan)
        return dc_replace(s, seconds=1.0 if plan.precision is None else 1.0 / speed)

    return score


def _chosen_fora(case: str) -> tuple:
    """A stock pipeline, its calibration run, and FORA 2 on it as a search's chosen candidate."""
    pipe, kwargs = build_case(case)
    calib = CalibrationRun(pipe, as_workload([kwargs]))
    plan = diffaccel.methods.fora(pipe, calib.num_steps, interval=2)
    s = calib.score(plan)
    chosen = Candidate(None, list(plan.schedule), s.psnr, s.psnr_min, s.ssim, s.mac_fraction, 0.5, "fora 2",
                       psnr_p5=s.psnr_p5, plan=plan)
    return pipe, calib, plan, chosen


def test_the_search_keeps_a_lower_precision_only_when_faster_within_the_budget_and_in_time(monkeypatch):
    """On diffusers' StableDiffusionPipeline (PNDM, tiny, random): the chosen plan is timed against
    itself under autocast; the lowered plan is returned only when it runs at least ``MIN_GAIN`` times
    as fast and still meets the budget it cleared, and not at all once the deadline has passed."""
    pipe, calib, plan, chosen = _chosen_fora("sd-pndm")
    lines: list[str] = []

    def lowered(speed: float, budget: str, deadline: float | None = None):
        monkeypatch.setattr(calib, "score", _timed(calib, speed))
        monkeypatch.setattr(calib, "forward_speed", lambda lowered: speed)
        return lower_precision(calib, chosen, plan, parse_budget(budget), deadline, lines.append, None, BF16)

    found, speed = lowered(1.6, "psnr>=5")
    assert speed == pytest.approx(1.6) and found.plan.precision == "bfloat16" and found.plan.schedule == plan.schedule
    assert found.latency_fraction == pytest.approx(0.5 / 1.6) and found.mac_fraction == chosen.mac_fraction
    assert found.psnr != chosen.psnr and found.source == "fora 2 in bfloat16"  # scored as it runs
    assert lowered(1.6, f"psnr>={found.psnr + 0.01}") is None  # faster, but short of the budget
    assert lowered(MIN_GAIN * 0.99, "psnr>=5") is None  # within the budget, but no faster
    assert lowered(1.6, "psnr>=5", deadline=time.time()) is None and "no time left" in lines[-1]
    assert lower_precision(calib, chosen, plan, parse_budget("psnr>=5"), None, lines.append, None, []) is None
    assert untouched(pipe)


def test_a_precision_whose_forward_is_slow_is_never_timed_on_whole_runs(monkeypatch):
    """Where bfloat16 is emulated (10-20x slower on a CPU without AVX-512 BF16), timing whole runs of
    the plan in it would overrun the search's time limit: one forward decides, and no run of the
    lowered plan is made. The look itself runs the real denoiser on the first step's inputs."""
    pipe, calib, plan, chosen = _chosen_fora("dit")
    speed = calib.forward_speed(BF16[0].forward)
    assert 0 < speed < float("inf") and not torch.is_autocast_enabled("cpu")
    scored: list[Plan] = []
    monkeypatch.setattr(calib, "score", lambda p: scored.append(p))
    monkeypatch.setattr(calib, "forward_speed", lambda lowered: 0.06)
    lines: list[str] = []
    assert lower_precision(calib, chosen, plan, parse_budget("psnr>=5"), None, lines.append, None, BF16) is None
    assert scored == [] and "runs 0.06x as fast as in float32 on this machine" in lines[-1]
    assert untouched(pipe)


def test_a_search_returns_the_lowered_plan_only_when_timed_faster_and_reports_it(monkeypatch):
    """A whole search (greedy, stock SD PNDM): with bfloat16 timed 1.6x as fast the plan returned is
    the lowered one, confirmed on the validation seeds, and ``summary.json`` says so; timed as fast
    as float32 it is not; with ``precision="none"`` it is never tried."""
    pipe, kwargs = build_case("sd-pndm")
    workload = as_workload([kwargs])
    real = CalibrationRun.score
    lines: list[str] = []

    def found(speed: float, precision: str = "bfloat16"):
        def score(self, plan):
            return dc_replace(real(self, plan), seconds=1.0 if plan.precision is None else 1.0 / speed)

        monkeypatch.setattr(CalibrationRun, "score", score)
        monkeypatch.setattr(CalibrationRun, "forward_speed", lambda self, lowered: speed)
        lines.clear()
        return search(pipe, workload, budget="psnr>=5", strategy="greedy", greedy_points=3, precision=precision,
                      log=lines.append)

    on = found(1.6)
    assert on.plan.precision == "bfloat16" and on.summary["precision"] == "bfloat16"
    assert on.summary["precision_speed"] == pytest.approx(1.6) and on.summary["validation_confirmed"]
    assert on.chosen.source.endswith(" in bfloat16") and on.summary["source"] == on.chosen.source
    assert any(line.startswith("precision: the chosen plan in bfloat16,") for line in lines)
    assert untouched(pipe)
    assert on.summary["precision_tried"][0]["kept"] and on.summary["precision_tried"][0]["speed"] == 1.6
    same = found(1.0)
    assert same.plan.precision is None and same.summary["precision_speed"] is None
    assert same.plan.schedule == on.plan.schedule  # the same pick, left in float32
    tried = same.summary["precision_tried"]  # what was measured and not kept is on record too
    assert tried == [{"arithmetic": "bfloat16", "forward_speed": 1.0}]
    off = found(1.6, "none")
    assert off.plan.precision is None and not any(line.startswith("precision:") for line in lines)
    with pytest.raises(SearchError, match="unknown precision"):
        search(pipe, workload, precision="int8", log=lines.append)


def test_a_joint_search_by_macs_tries_int8_on_the_plan_it_chose_and_keeps_it_only_when_timed_faster(monkeypatch,
                                                                                                    tmp_path):
    """On diffusers' DiTPipeline (tiny, random): with a real integer backend, a joint search by MACs
    searches in float32 (hand-made plans too; no quantized phase, whose plans would tie on MACs) and
    tries the chosen plan quantized as its last step: returned quantized when timed 1.6x as fast
    within the budget, else as chosen. A simulated backend could never be chosen by MACs: a clear error."""
    pipe, kwargs = build_case("dit")
    work = as_workload([kwargs])
    ranges = activation_ranges(pipe, work, progress=False).save(tmp_path / "ranges.safetensors")
    spec = QuantSpec(weight_bits=8, act_bits=8, backend="int8-dynamic", calibration=str(ranges))
    real = CalibrationRun.score
    lines: list[str] = []

    def found(speed: float):
        def score(self, plan):
            return dc_replace(real(self, plan), seconds=1.0 if plan.quant is None else 1.0 / speed)

        monkeypatch.setattr(CalibrationRun, "score", score)
        monkeypatch.setattr(CalibrationRun, "forward_speed", lambda self, lowered: speed)
        lines.clear()
        return search(pipe, work, budget="psnr>=5", strategy="joint", quant=spec, time_limit=30,
                      precision="none", heldout=None, log=lines.append)

    fast = found(1.6)
    assert fast.plan.quant == spec and fast.summary["quant"]["backend"] == "int8-dynamic"
    assert fast.summary["precision_speed"] == pytest.approx(1.6)
    assert fast.chosen.source.endswith(" in W8A8 int8-dynamic")
    assert all(c.plan is None or c.plan.quant is None for c in fast.handmade)  # searched and compared in float32
    assert any(line.startswith("precision: the chosen plan in W8A8 int8-dynamic") for line in lines)
    assert not any("on the full-compute run" in line for line in lines)  # no quantized phase
    with diffaccel.accelerate(pipe, fast.plan):
        assert torch.isfinite(run(pipe, kwargs)).all()
    assert untouched(pipe)
    assert not any(isinstance(m, QuantizedLayer) for m in find_denoiser(pipe)[0].modules())
    same = found(1.0)
    assert same.plan.quant is None and same.summary["precision_speed"] is None
    with pytest.raises(SearchError, match="simulated quantization"):
        search(pipe, work, strategy="joint", quant=spec.model_copy(update={"backend": "fake"}), log=lines.append)


def test_the_first_look_at_int8_runs_the_quantized_denoiser_and_puts_the_float_layers_back(tmp_path):
    pipe, kwargs = build_case("dit")
    work = as_workload([kwargs])
    model = find_denoiser(pipe)[0]
    ranges = activation_ranges(pipe, work, progress=False).save(tmp_path / "ranges.safetensors")
    spec = QuantSpec(weight_bits=8, act_bits=8, backend="int8-dynamic", calibration=str(ranges))
    calib = CalibrationRun(pipe, work)
    looks = arithmetic_choices("none", spec, model)
    assert [a.label for a in looks] == ["W8A8 int8-dynamic"]
    assert arithmetic_choices("none", spec.model_copy(update={"backend": "fake"}), model) == []
    seen: list[int] = []
    with looks[0].forward():
        seen.append(sum(isinstance(m, QuantizedLayer) for m in model.modules()))
    assert seen[0] > 0 and not any(isinstance(m, QuantizedLayer) for m in model.modules())
    assert 0 < calib.forward_speed(looks[0].forward) < float("inf")
    assert looks[0].lowered(identity_plan(model)).quant == spec


def test_an_arithmetic_this_device_cannot_run_is_logged_and_the_plan_kept():
    """fbgemm's int8 kernel on a model on a GPU, say: the look raises a clear error, which the last
    step logs and passes over (the search returns its float32 plan instead of failing at its end)."""
    pipe, calib, plan, chosen = _chosen_fora("dit")

    @contextmanager
    def refused():
        raise QuantError("the int8-dynamic backend runs on a CPU only; use int8 on a GPU")
        yield

    lines: list[str] = []
    looks = [Arithmetic("W8A8 int8-dynamic", lambda p: p.with_quant(None), refused)]
    assert lower_precision(calib, chosen, plan, parse_budget("psnr>=5"), None, lines.append, None, looks) is None
    assert "cannot run in W8A8 int8-dynamic here: the int8-dynamic backend runs on a CPU only" in lines[-1]
    assert untouched(pipe)

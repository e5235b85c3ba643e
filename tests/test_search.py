"""Plan search: budgets, DP, the strategies on tiny random-weight pipelines, resumption after a
kill, refused storage, impossible budgets, and the CLI."""

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler

import diffaccel
from conftest import requires_weights
from diffaccel import methods
from diffaccel.calibration.dp import optimal_keys
from diffaccel.calibration.reference import CalibrationRun, identity_plan
from diffaccel.calibration.workload import Workload, as_workload
from diffaccel.cli.search import default_strategy, summary_line
from diffaccel.errors import SearchError, SearchWarning, SettingError, WorkloadError
from diffaccel.eval.paired import paired_change
from diffaccel.plan import Plan
from diffaccel.runtime.executor import Executor
from diffaccel.search import (
    BudgetError,
    CalibrationError,
    StorageMismatchError,
    parse_budget,
    parse_duration,
    search,
)
from diffaccel.search import heldout as heldout_module
from diffaccel.search import judged as judged_module
from diffaccel.search import run as search_run
from diffaccel.search.candidates import Candidate, choose
from diffaccel.search.config import TAIL_IMAGES, SearchConfig, auto_margin, configured, tail_lower_bound
from diffaccel.search.context import Context
from diffaccel.search.handmade import handmade_plans
from diffaccel.search.heldout import compare, heldout_check, heldout_reserve
from diffaccel.search.judged import JudgedCheck, chance_to_pass
from diffaccel.search.result import marked
from diffaccel.search.sizing import (
    CALIBRATION_PER_CLASS,
    HELDOUT_PER_CLASS,
    PROBE_STEPS,
    SIZES_FILE,
    affordable_sizes,
    kept_sizes,
)
from diffaccel.search.space import Space
from diffaccel.search.validation import (
    FINAL_SHARE,
    MAX_COPIES,
    MAX_VALIDATED,
    VALIDATION_SEED_OFFSET,
    Validator,
    plan_getter,
    tail_text,
    validate,
    validation_seconds,
    validator_for,
)
from diffaccel.zoo.pipeline import shapes_workload
from stock_pipelines import build as build_case
from test_engine import make_pipes, untouched

STEPS = 6
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def pipes():
    torch.set_num_threads(1)
    return make_pipes()


def calib(steps=STEPS):
    return shapes_workload([0, 1], steps, per_class=1)


def heldout(steps=STEPS):
    return shapes_workload([2], steps, per_class=1, calibration=False)


def quiet(_line):
    pass


# -- budgets -----------------------------------------------------------------------------------------
def test_budget_parsing():
    assert parse_budget("psnr>=30").threshold == 30 and parse_budget("psnr>=30").metric == "psnr"
    assert parse_budget(" SSIM >= 0.95 ").metric == "ssim" and parse_budget("ssim>=.9").threshold == 0.9
    assert parse_budget("psnr>=2.5e1").threshold == 25
    for bad in ("psnr>30", "psnr<=30", "fid>=3", "psnr>=", "30", "", "psnr>=abc", "ssim>=1.5", "psnr>=-1"):
        with pytest.raises(BudgetError):
            parse_budget(bad)
    with pytest.raises(BudgetError, match="bounds psnr_p5 twice"):  # not: the last one wins
        parse_budget("psnr>=30,psnr_p5>=24,psnr_p5>=5")
    with pytest.raises(BudgetError, match="finite"):
        parse_budget("psnr>=1e400")
    judged = parse_budget("psnr>=30, judge>=-1")
    assert judged.judge == -1 and judged.text == "psnr>=30,judge>=-1" and parse_budget(judged.text) == judged
    assert judged.raised(0.8).judge == -1  # the judge's bound is checked on its own images, not raised
    for bad, message in (("psnr>=30,judge>=-101", "between -100 and 100"), ("judge>=-1", "exactly one of"),
                         ("psnr>=30,judge>=-1,judge>=-2", "bounds judge twice")):
        with pytest.raises(BudgetError, match=message):
            parse_budget(bad)
    with pytest.raises(SearchError, match="leave validate on"):
        SearchConfig(budget="psnr>=30,judge>=-1", validate=False).check()
    with pytest.raises(SearchError, match="judge_images"):
        SearchConfig(budget="psnr>=30,judge>=-1", judge_images=0).check()
    # checked before the calibration run (they had been optuna's and the DP's ValueErrors after it)
    for bad in ({"population": 1}, {"population": 2.5}, {"k_values": (0,)}, {"k_values": ()}, {"k_values": (2.0,)}):
        with pytest.raises(SettingError, match="population|k_values"):
            SearchConfig(**bad).check()
    SearchConfig(k_values=(99,)).check()  # the steps are known after the calibration run
    with pytest.raises(SettingError, match="from 1 to 6"):
        SearchConfig(k_values=(99,)).check_k_values(6)


def test_unparsable_budget_fails_before_any_work(pipes):
    def never(_pipe):
        raise AssertionError("the calibration set must not run")

    with pytest.raises(BudgetError, match="psnr>=X"):
        search(pipes[0], never, budget="quality>=30", log=quiet)


def test_search_settings_are_checked_before_any_work(pipes):
    def never(_pipe):
        raise AssertionError("the calibration set must not run")

    with pytest.raises(diffaccel.search.SearchError, match="'time' \\(did you mean 'time_limit'\\?\\)"):
        search(pipes[0], never, time="40s", log=quiet)
    with pytest.raises(diffaccel.search.SearchError, match="time_limit is in seconds"):
        search(pipes[0], never, config=SearchConfig(time_limit=-5), log=quiet)
    assert configured(None, {"time_limit": "2m", "strategy": "dp"}) == SearchConfig(time_limit=120.0, strategy="dp")
    assert all(parse_duration(zero) is None for zero in ("0", "0s", "0.0m", 0, None))  # zero in any unit: no limit
    assert configured(None, {"time_limit": 0}).time_limit is None and configured(None, {"time_limit": 0.0}) == \
        configured(None, {"time_limit": "0s"})
    # as the docs say, in a SearchConfig too (both had been refused by its own check, whose text allows them)
    assert SearchConfig(time_limit="15m").time_limit == 900.0 and SearchConfig(time_limit=0).time_limit is None
    SearchConfig(strategy="joint", time_limit="20s").check()


# -- dynamic programming -----------------------------------------------------------------------------
def brute_force(d: np.ndarray, k: int) -> float:
    steps = d.shape[0]
    best = np.inf
    for rest in itertools.combinations(range(1, steps), k - 1):
        keys = {0, *rest}
        cost, last = 0.0, 0
        for i in range(steps):
            if i in keys:
                last = i
            else:
                cost += d[last, i]
        best = min(best, cost)
    return best


def test_dp_finds_the_optimal_recompute_steps():
    rng = np.random.default_rng(0)
    for trial in range(4):
        steps = 8
        d = np.triu(rng.random((steps, steps)), 1) * (1 + np.arange(steps))[None, :] ** (trial % 2)
        for k in range(1, steps + 1):
            keys, cost = optimal_keys(d, k)
            assert len(keys) == k and keys[0] == 0 and len(set(keys)) == k
            served = [max(j for j in keys if j <= i) for i in range(steps)]
            assert np.isclose(sum(d[served[i], i] for i in range(steps) if i not in keys), cost)
            assert np.isclose(cost, brute_force(d, k)), (trial, k)


def test_keysteps_method_computes_only_its_key_steps(pipes):
    """The DP schedule as a method: ``keys`` all-compute steps, every unit reused elsewhere, fewer MACs;
    the all-compute extreme reproduces the unaccelerated output exactly."""
    from diffaccel.eval.cost import plan_mac_fraction
    from diffaccel.methods.registry import build
    from test_engine import call

    for pipe in pipes:
        calls = pipe.workload_calls(STEPS, per_class=1)
        plan = build("keysteps", pipe, STEPS, guidance=3.0, keys=3, calls=calls)
        full = ["C" * len(plan.units)]
        assert [row == full[0] for row in plan.schedule].count(True) == 3 and plan.schedule[0] == full[0]
        assert all(set(row) == {"R"} for row in plan.schedule if row != full[0])
        assert plan.params["key_steps"][0] == 0 and len(plan.params["key_steps"]) == 3
        assert plan_mac_fraction(plan, [1.0] + [1.0 / len(plan.units)] * len(plan.units)) < 0.75
        exact = build("keysteps", pipe, STEPS, keys=STEPS, calls=calls)
        with diffaccel.accelerate(pipe, exact):
            accelerated = call(pipe, steps=STEPS)
        assert torch.equal(accelerated, call(pipe, steps=STEPS))
        for bad in ({"keys": 0}, {"keys": STEPS + 1}, {"level": "nowhere"}):
            with pytest.raises(ValueError):
                build("keysteps", pipe, STEPS, calls=calls, **bad)


def test_equal_quality_reads_the_handmade_front():
    from diffaccel.search.versus import Point, bracket, cost_at, cost_bracket, front, psnr_at, psnr_at_wall

    points = [Point("a", {}, 30.0, 4.0), Point("b", {}, 34.0, 2.0), Point("dominated", {}, 29.0, 3.0),
              Point("c", {}, 40.0, 1.25)]
    assert [p.name for p in front(points)] == ["a", "b", "c"]
    fast, slow, weight = bracket(points, 32.0)
    assert (fast.name, slow.name, weight) == ("a", "b", 0.5)
    assert cost_at(points, 32.0) == pytest.approx(0.5 * 0.25 + 0.5 * 0.5)  # cost, not speed, is interpolated
    assert cost_at(points, 34.0) == pytest.approx(0.5)
    assert cost_at(points, 41.0) is None and cost_at(points, 29.5) is None  # no extrapolation
    assert cost_at(points, 32.0, "speedup_wall") is None  # wall-clock not measured for the bracket
    fast.speedup_wall, slow.speedup_wall = 3.0, 1.5
    assert cost_at(points, 32.0, "speedup_wall") == pytest.approx(0.5 / 3.0 + 0.5 / 1.5)
    assert psnr_at(points, 1 / 0.375) == pytest.approx(32.0) and psnr_at(points, 5.0) is None
    around = cost_bracket(points, 3.0)
    assert [p.name for p in around] == ["a", "b"] and cost_bracket(points, 5.0) is None
    assert psnr_at_wall(around, 2.0) == pytest.approx(32.0)  # cost 0.5 halfway between 1/3 and 2/3
    assert psnr_at_wall(around, 4.0) is None  # faster than both: no extrapolation


# -- the strategies on tiny pipelines -------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_search(pipes, tmp_path_factory):
    out = tmp_path_factory.mktemp("dit-search")
    result = search(pipes[0], calib(), budget="psnr>=20", strategy="nsga2", trials=10, population=4,
                    out=out, heldout=heldout(), pairs=1, log=quiet)
    return result, out


def check_outputs(out: Path, pipe, result):
    plan = Plan.load(out / "plan.json")
    assert plan == result.plan and plan.schedule is not None and set(plan.schedule[0]) == {"C"}
    front = json.loads((out / "front.json").read_text())
    assert front["front"] and all({"schedule", "calib_psnr", "mac_fraction"} <= set(p) for p in front["front"])
    costs = [p["mac_fraction"] for p in front["front"]]
    psnrs = [p["calib_psnr"] for p in front["front"]]
    assert costs == sorted(costs) and psnrs == sorted(psnrs)  # non-dominated: dearer only if better
    assert front["handmade"] and (out / "front.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("calib_psnr", "heldout_psnr", "speedup_macs", "speedup_wall", "best_handmade"):
        assert key in summary, key
    hand = summary["best_handmade"]
    assert {"name", "settings", "calib_psnr", "heldout_psnr", "speedup_macs", "speedup_wall"} <= set(hand)
    # the chosen plan is the cheapest that clears the budget by the margin (when one does)
    points = [p for p in front["front"] if p["calib_psnr"] >= 20 + summary["margin"]]
    assert 0.5 <= summary["margin"] <= 3.0 and summary["clears_margin"] == bool(points)  # automatic margin
    if points:  # ... unless the fresh validation seeds refused it: then a dearer one that they confirmed
        tried = summary["validation_tried"]
        assert tried and summary["validation_confirmed"] == tried[-1]["met"]
        cheapest = min(p["mac_fraction"] for p in points)
        if tried[0]["met"]:
            assert summary["mac_fraction"] == pytest.approx(cheapest)
        else:
            assert summary["mac_fraction"] >= cheapest - 1e-9
    # the plan runs in the executor and saves what the search says it saves
    with diffaccel.accelerate(pipe, plan) as run:
        images = calib()(pipe)
    assert torch.isfinite(images).all() and run.stats.reused > 0
    assert np.isclose(run.stats.macs / run.stats.full_macs, summary["mac_fraction"], rtol=0.02)
    assert summary["speedup_macs"] > 1 and summary["heldout_psnr"] > 0
    assert summary["heldout_met"] == (summary["heldout_psnr"] >= 20)  # budget psnr>=20, no tail bound


def test_nsga2_search_writes_a_runnable_plan_and_its_front(pipes, dit_search):
    result, out = dit_search
    assert result.met and result.summary["calib_psnr"] >= 20 and result.summary["trials_complete"] == 10
    sources = {c.source for c in result.front}
    assert sources  # seeds and GA children are both labelled
    check_outputs(out, pipes[0], result)


@pytest.mark.parametrize("strategy", ["dp", "greedy"])
def test_profile_strategies_on_a_unet(pipes, tmp_path, strategy):
    result = search(pipes[1], calib(), budget="psnr>=15", strategy=strategy, out=tmp_path,
                    heldout=heldout(), pairs=1, k_values=[2, 3],
                    greedy_points=4, log=quiet)
    assert result.met and result.plan.method == f"search-{strategy}"
    check_outputs(tmp_path, pipes[1], result)


def test_latency_objective_and_ssim_budget(pipes):
    result = search(pipes[0], calib(), budget="ssim>=0.5", objective="latency", strategy="greedy",
                    greedy_points=3, log=quiet)
    assert result.met and result.chosen.ssim >= 0.5 and 0 < result.chosen.latency_fraction < 1
    assert result.summary["heldout_psnr"] is None  # no held-out set given


def test_a_search_whose_time_went_to_the_seeds_returns_the_best_seed_and_says_so(pipes, monkeypatch):
    monkeypatch.setattr(search_run, "_run_strategy", lambda ctx, seeds: 0)  # the deadline came after the seeds
    lines = []
    result = search(pipes[0], calib(), budget="psnr>=5", strategy="dp", k_values=[2], log=lines.append)
    assert result.met and result.summary["chosen_is_handmade"]
    assert any(line.strip().startswith("hand-made ") for line in lines)  # each seed's score is shown
    assert any("ran out on the hand-made plans" in line for line in lines)


@pytest.mark.parametrize("budget,margin", [("psnr>=5", None), ("psnr>=5", 500.0), ("psnr>=500", None)])
def test_hand_made_plans_are_scored_cheapest_first_and_dearer_ones_than_a_clear_pass_are_not(pipes, monkeypatch,
                                                                                             budget, margin):
    """On a slow pipeline the 13 hand-made plans took a third of a 30-minute search. One that costs
    at least as much as a hand-made plan meeting the budget by the largest margin the search may add
    can be neither returned nor the best hand-made plan: it is not scored."""
    from diffaccel.search.handmade import handmade_plans

    monkeypatch.setattr(search_run, "_run_strategy", lambda ctx, seeds: 0)
    lines = []
    result = search(pipes[0], calib(), budget=budget, margin=margin, strategy="dp", k_values=[2], log=lines.append)
    run = CalibrationRun(pipes[0], calib())
    costs = sorted(run.fractions(h.plan)[0] for h in handmade_plans(pipes[0].denoiser, STEPS))
    scored = [c.mac_fraction for c in result.handmade]
    assert len(costs) >= 5 and scored == sorted(scored)
    if budget == "psnr>=5" and margin is None:  # the cheapest clears 8 dB (the largest margin: 3) at once
        assert len(scored) == 1 and scored[0] == pytest.approx(costs[0])
        assert any(f"{len(costs) - 1} dearer hand-made plans not scored" in line for line in lines)
    else:  # none clears by the margin given, or none meets the budget: every plan is scored
        assert len(scored) == len(costs) and not any("not scored" in line for line in lines)


def test_the_held_out_comparison_counts_flops_only_in_its_untimed_runs(pipes, monkeypatch):
    counted = []
    measured = Executor._measured
    monkeypatch.setattr(Executor, "_measured", lambda self, *args: counted.append(1) or measured(self, *args))
    plan = diffaccel.methods.fora(pipes[0].denoiser, STEPS, interval=2)
    record = compare(pipes[0], heldout(), plan, pairs=2)
    assert record["pairs"] == 2 and record["speedup_macs"] > 1
    assert len(counted) == 2  # the plan's warm-up and the baseline's count; no timed run pays the counter
    # a time limit that has passed: one pair is timed, no more (the search's whole run keeps its limit)
    assert compare(pipes[0], heldout(), plan, pairs=3, deadline=time.time())["pairs"] == 1


def test_the_automatic_margin_bounds_the_error_of_the_calibration_mean():
    # spread 4 dB over 16 images: 1.645 * 4 / 4; the plan 20 dB off the budget is not consulted
    assert auto_margin([(31.0, 4.0), (29.5, 4.0), (50.0, 40.0)], 30, 16) == pytest.approx(1.645)
    assert auto_margin([(31.0, 1.0)], 30, 16) == 0.5  # never below the default
    assert auto_margin([(31.0, 40.0)], 30, 4) == 3.0  # nor above the cap
    assert auto_margin([(31.0, None)], 30, 16) == 0.5 and auto_margin([], 30, 16) == 0.5
    assert auto_margin([(50.0, 2.0)], 30, 4) == pytest.approx(1.645)  # none near the budget: all of them


def test_the_held_out_reserve_counts_the_chosen_plans_comparison_and_leaves_the_search_half_its_limit():
    lines = []
    ctx = SimpleNamespace(calib=SimpleNamespace(seconds=100.0, calibrate=None), log=lines.append,
                          config=SimpleNamespace(pairs=3, time_limit=3600.0))
    # 3 pairs and the MAC-counted run of each side, once: the hand-made plan's comparison is not reserved
    assert heldout_reserve(ctx, heldout=object()) == pytest.approx(100 * 4.4 * 1.5) and not lines
    assert heldout_reserve(ctx, heldout=None) == 0.0
    ctx.config.time_limit = 900.0  # a slow machine: the check would take 660 s of 900
    assert heldout_reserve(ctx, heldout=object()) == 450
    assert lines and "more than half" in lines[0]
    # every step after the search together (a judge's 600 images on a loaded machine): half the limit at most
    Context.keep_back(ctx, 400.0)
    assert ctx.reserve == 400.0 and len(lines) == 1
    Context.keep_back(ctx, 3674.0)
    assert ctx.reserve == 450.0 and "steps after the search are estimated at 3674 s" in lines[-1]


def test_the_best_handmade_plans_held_out_check_is_skipped_when_it_would_end_past_the_limit(monkeypatch):
    """The held-out reserve is an estimate; on a slow text-to-image pipeline it fell short (an SD search
    ran 13% past its 30-minute limit). The hand-made plan's comparison, the second of two, is skipped
    when it would end past the limit, and the summary and its one-line report say so."""
    compared = []

    def timed_compare(pipe, fn, plan, pairs, deadline=None, judge=None):  # a comparison that takes 0.2 s
        compared.append(plan)
        time.sleep(0.2)
        return {"psnr": 31.0, "psnr_p5": 25.0, "psnr_min": 20.0, "ssim": 0.9, "speedup_macs": 4.0,
                "speedup_macs_denoiser": 4.5, "speedup_wall": 3.5, "images": 4, "pairs": pairs,
                "seconds_base": 10.0, "seconds_plan": 2.5, "allocator": "kept"}

    monkeypatch.setattr(heldout_module, "compare", timed_compare)
    lines: list[str] = []
    hand = SimpleNamespace(source="deepcache 5", latency_fraction=0.5)
    handmade = [SimpleNamespace(key="deepcache 5", plan="the hand-made plan")]

    def check(started: float, source: str = "unipc 5") -> dict:
        compared.clear()
        ctx = SimpleNamespace(calib=SimpleNamespace(pipe=None, reference=[0] * 4), log=lines.append,
                              budget=parse_budget("psnr>=30"), started=started, judge=None,
                              config=SimpleNamespace(pairs=2, time_limit=900.0))
        summary = {"met": True, "model": "m", "strategy": "joint", "calib_psnr": 32.0, "budget": "psnr>=30",
                   "source": source, "calib_speedup_macs": 2.9,
                   "best_handmade": {"name": "deepcache", "settings": {"interval": 5}, "met": True,
                                     "calib_psnr": 33.0, "calib_speedup_macs": 2.6}}
        heldout_check(ctx, summary, "the chosen plan", object(), (hand, True, 0.0), handmade)
        return summary

    in_time = check(started=time.time())
    assert compared == ["the chosen plan", "the hand-made plan"] and in_time["best_handmade"]["heldout_psnr"] == 31.0
    late = check(started=time.time() - 899.9)  # 0.1 s left before the first, which takes 0.2 s
    assert compared == ["the chosen plan"] and late["best_handmade"]["heldout_skipped"] == "time limit"
    assert "not re-measured on the held-out seeds" in lines[-1]
    assert "not re-measured: time limit" in summary_line(late) and "3.50x wall" in summary_line(late)
    assert "5th pct" not in summary_line(late)  # the budget bounds the mean only
    tailed = {**late, "budget": "psnr>=30,psnr_p5>=25", "heldout_psnr_p5": 26.04, "validation_psnr_p5_bound": 27.34}
    assert "(5th pct 26.0 dB held-out, at least 27.3 on validation)" in summary_line(tailed)
    assert "denoiser MACs" in summary_line(late) and "the chosen plan there: 2.90x" in summary_line(late)
    # the hand-made plan chosen: its held-out figures are the chosen plan's, not "not re-measured" calibration ones
    same = check(started=time.time() - 899.9, source="deepcache 5")
    assert compared == ["the chosen plan"] and same["best_handmade"]["speedup_macs"] == same["speedup_macs"] == 4.0
    assert "is the plan chosen" in summary_line(same) and "not re-measured" not in summary_line(same)


def test_a_plan_slower_than_the_pipeline_on_the_held_out_check_is_said_to_be(monkeypatch):
    monkeypatch.setattr(heldout_module, "compare", lambda *args: {
        "psnr": 33.0, "psnr_p5": 27.0, "psnr_min": 25.0, "ssim": 0.95, "speedup_macs": 1.11,
        "speedup_macs_denoiser": 1.12, "speedup_wall": 0.86, "images": 4, "pairs": 3, "seconds_base": 1.0,
        "seconds_plan": 1.16, "allocator": "kept"})
    lines: list[str] = []
    ctx = SimpleNamespace(calib=SimpleNamespace(pipe=None, reference=[0] * 4), log=lines.append,
                          budget=parse_budget("psnr>=30"), started=time.time(), judge=None,
                          config=SimpleNamespace(pairs=3, time_limit=None))
    summary = {"met": True}
    heldout_check(ctx, summary, "the chosen plan", object(), None, [])
    assert summary["heldout_met"] and any("ran slower than the unaccelerated pipeline (0.86x" in line
                                          for line in lines)


def test_space_holds_the_handmade_schedules(pipes):
    from diffaccel.search.handmade import handmade_plans

    for pipe in pipes:
        space = Space(pipe.denoiser, 8)
        plans = handmade_plans(pipe.denoiser, 8)
        assert plans and all(space.genome(h.plan.schedule) is not None for h in plans)
        genome = space.genome(plans[0].plan.schedule)
        assert space.rows(genome) == [r.replace("F", "R") for r in plans[0].plan.schedule]


# -- bad input ---------------------------------------------------------------------------------------------
def test_impossible_budget_reports_the_shortfall_and_still_writes(pipes, tmp_path):
    with pytest.warns(SearchWarning, match="no plan that saves work met psnr>=99"):
        result = search(pipes[0], calib(), budget="psnr>=99", strategy="dp", k_values=[2, 4], out=tmp_path,
                        log=quiet)
    assert not result.met and result.shortfall > 0 and result.plan.params["budget_met"] is False
    assert np.isclose(result.shortfall, 99 - result.chosen.psnr)
    assert result.chosen.psnr == max(c.psnr for c in result.front)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["met"] is False and summary["shortfall"] > 0 and (tmp_path / "plan.json").exists()
    assert summary["shortfall_text"] == f"{99 - result.chosen.psnr:.4g} dB on the mean"


def test_a_missed_tail_bound_is_the_shortfall_and_ranks_the_closest_plan():
    """The mean alone had ranked the closest plan and set its shortfall: 31.9 dB against psnr>=30 read
    "short by -1.87" while its 5th percentile missed psnr_p5>=40 by 14.6 dB."""
    budget = parse_budget("psnr>=30,psnr_p5>=40")
    high_mean = Candidate(None, [], 31.9, 20.0, 0.9, 0.5, 0.5, "a", psnr_p5=25.4)
    high_tail = Candidate(None, [], 30.5, 30.0, 0.9, 0.6, 0.6, "b", psnr_p5=38.0)
    chosen, met, shortfall = choose([high_mean, high_tail], budget, "macs")
    assert chosen is high_tail and not met and shortfall == pytest.approx(2.0)
    assert budget.shortfall(31.9, 25.4) == pytest.approx(14.6)
    assert budget.miss_text(29.0, 25.4) == "1 dB on the mean and 14.6 dB on the 5th percentile"
    ssim = parse_budget("ssim>=0.9")
    assert ssim.shortfall(0.85, None) == pytest.approx(0.05) and ssim.miss_text(0.85, None) == "0.05 on the mean"


def test_storage_from_another_model_is_refused(pipes, dit_search):
    _, out = dit_search
    with pytest.raises(StorageMismatchError, match="another model"):
        search(pipes[1], calib(), budget="psnr>=20", out=out, trials=1, log=quiet)
    other_steps = make_pipes()[0]
    with pytest.raises(StorageMismatchError, match=f"this model at {STEPS} denoiser evaluations, not {STEPS + 1}"):
        search(other_steps, calib(STEPS + 1), budget="psnr>=20", out=out, trials=1, log=quiet)


def test_storage_of_other_calls_is_refused(pipes, tmp_path):
    """Two workloads of user calls read alike ("1 calls, seeds from N"): the calls themselves tell them apart."""
    def calls(label):
        return Workload.from_calls([{"class_labels": [label], "num_inference_steps": STEPS}])

    search(pipes[0], calls(0), budget="psnr>=20", strategy="dp", k_values=[2], out=tmp_path, heldout=None,
           log=quiet)
    with pytest.raises(StorageMismatchError, match="another calibration set"):
        search(pipes[0], calls(1), budget="psnr>=20", strategy="dp", k_values=[2], out=tmp_path, heldout=None,
               log=quiet)


def test_empty_or_mismatched_calibration_sets(pipes):
    with pytest.raises(WorkloadError, match="empty"):
        shapes_workload([0], STEPS, per_class=0)
    with pytest.raises(CalibrationError, match="no images"):
        search(pipes[0], lambda pipe: torch.zeros(0, 3, 16, 16), log=quiet)
    with pytest.raises(CalibrationError, match=r"failed on the call for 9 .*class ids must lie in \[0, 6\)"):
        search(pipes[0], shapes_workload([9], STEPS, per_class=1), log=quiet)
    with pytest.raises(CalibrationError, match="never ran"):
        search(pipes[0], lambda pipe: torch.rand(2, 3, 16, 16), log=quiet)
    mixed = as_workload([*shapes_workload([0], STEPS, per_class=1).with_steps(STEPS).calls,
                         *shapes_workload([1], STEPS, per_class=1).with_steps(STEPS + 2).calls])
    with pytest.raises(CalibrationError, match=r"different step counts .*same num_inference_steps"):
        search(pipes[0], mixed, log=quiet)  # every plan is indexed by one run's steps


# -- resumption -----------------------------------------------------------------------------------------
RESUME = dict(budget="psnr>=20", strategy="nsga2", population=4, seed=3)
RESUME_TRIALS = 12
SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_engine import make_pipes
    from diffaccel.search import search
    from diffaccel.zoo.pipeline import shapes_workload
    search(make_pipes()[0], shapes_workload([0, 1], {steps}, per_class=1), trials={trials}, out=sys.argv[1],
           log=lambda m: None, **{resume!r})
""")


def completed(db: Path, state: str = "COMPLETE") -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = ?", (state,)).fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def front_of(out: Path) -> list[tuple]:
    front = json.loads((out / "front.json").read_text())["front"]
    return [(tuple(p["schedule"]), round(p["calib_psnr"], 6), round(p["mac_fraction"], 9)) for p in front]


@pytest.fixture(scope="module")
def straight(pipes, tmp_path_factory):
    """An uninterrupted search: the front a resumed one must reach."""
    out = tmp_path_factory.mktemp("straight")
    search(pipes[0], calib(), trials=RESUME_TRIALS, out=out, log=quiet, **RESUME)
    return front_of(out)


def test_killed_search_resumes_to_the_same_front(pipes, straight, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), steps=STEPS, trials=RESUME_TRIALS, resume=RESUME))
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent / "src")}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    db = tmp_path / "study.db"
    while (completed(db) < 5 or not completed(db, "RUNNING")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # kill it during an evaluation
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 5 <= completed(tmp_path / "study.db") < RESUME_TRIALS
    search(pipes[0], calib(), trials=RESUME_TRIALS, out=tmp_path, log=quiet, **RESUME)  # the same command
    assert completed(tmp_path / "study.db") == RESUME_TRIALS
    assert front_of(tmp_path) == straight


def _hanging_trial(pipe, tmp_path):
    """A study of 7 trials plus one asked for and left RUNNING, as by a worker killed before any beat."""
    import optuna

    from diffaccel.search.nsga import ClockSeededNSGAII

    search(pipe, calib(), trials=7, out=tmp_path, log=quiet, **RESUME)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    name = optuna.get_all_study_names(url)[0]
    sampler = ClockSeededNSGAII(seed=RESUME["seed"], population_size=RESUME["population"])
    hanging = optuna.load_study(study_name=name, storage=url, sampler=sampler).ask(
        Space(pipe.denoiser, STEPS).distributions())
    return url, name, hanging


def _assert_failed_and_retried_once(url, name, hanging):
    import optuna

    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    assert trials[hanging.number].state.name == "FAIL"
    retried = [t for t in trials if t.user_attrs.get("retry_of") == hanging.number]
    assert len(retried) == 1 and retried[0].params == hanging.params and retried[0].state.name == "COMPLETE"


def test_a_search_storage_it_cannot_write_to_is_refused_in_one_line(pipes, tmp_path):
    """Re-running a finished search on a read-only copy of its folder ended in optuna's
    StorageInternalError traceback; it is a SearchError that says what to give instead."""
    search(pipes[0], calib(), trials=4, out=tmp_path, log=quiet, **RESUME)
    read_only = f"sqlite:///file:{tmp_path / 'study.db'}?mode=ro&uri=true"
    with pytest.raises(SearchError, match="cannot write to the search storage .*readonly"):
        search(pipes[0], calib(), trials=4, storage=read_only, log=quiet, **RESUME)


def test_a_trial_left_running_is_re_evaluated(pipes, straight, tmp_path):
    """A kill during an evaluation leaves the trial RUNNING: it is failed, and its parameters
    evaluated again first."""
    url, name, hanging = _hanging_trial(pipes[0], tmp_path)
    search(pipes[0], calib(), trials=RESUME_TRIALS, out=tmp_path, log=quiet, **RESUME)
    _assert_failed_and_retried_once(url, name, hanging)
    assert front_of(tmp_path) == straight


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_re_evaluated(pipes, straight, tmp_path,
                                                                             monkeypatch):
    """With another live process on the study (its lock held), a RUNNING trial that never beat is
    failed once its start is older than the grace period, and evaluated again."""
    import fcntl

    monkeypatch.setenv("DIFFACCEL_HEARTBEAT_S", "1")
    monkeypatch.setenv("DIFFACCEL_GRACE_S", "2")
    url, name, hanging = _hanging_trial(pipes[0], tmp_path)
    with open(str(tmp_path / "study.db") + ".lock", "a+") as other:  # a live worker: no fail-all on start
        fcntl.flock(other, fcntl.LOCK_SH)
        time.sleep(2.5)
        search(pipes[0], calib(), trials=RESUME_TRIALS, out=tmp_path, log=quiet, **RESUME)
    _assert_failed_and_retried_once(url, name, hanging)
    assert front_of(tmp_path) == straight


# -- the command line ------------------------------------------------------------------------------
def run_cli(monkeypatch, capsys, *args):
    from diffaccel.cli import main

    monkeypatch.setattr(sys, "argv", ["diffaccel", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_bad_budget_is_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "search", "--budget", "psnr=30", "--out", tmp_path)
    assert code != 0 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "psnr>=X" in err
    code, _, err = run_cli(monkeypatch, capsys, "search", "--calib-per-class", "0", "--out", tmp_path)
    assert code != 0 and "calib-per-class" in err and len(err.strip().splitlines()) == 1


@requires_weights
def test_cli_search_on_an_embedded_model(monkeypatch, capsys, tmp_path):
    out = tmp_path / "search"
    code, stdout, err = run_cli(monkeypatch, capsys, "search", "--model", "unet", "--budget", "psnr>=20",
                                "--steps", "4", "--calib-per-class", "1", "--heldout-per-class", "1", "--trials",
                                "4", "--population", "2", "--pairs", "1", "--out", out)
    assert code == 0, err
    assert "x MACs" in stdout and "held-out" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "unet-ddim" and summary["heldout_psnr"] is not None
    code, stdout, err = run_cli(monkeypatch, capsys, "generate", "--model", "unet", "--classes", "circle",
                                "--per-class", "2", "--steps", "4", "--plan", out / "plan.json", "--out",
                                tmp_path / "gen")
    assert code == 0, err


@requires_weights
def test_cli_search_defaults_to_the_joint_strategy_with_image_sets_the_time_limit_affords(
        monkeypatch, capsys, tmp_path):
    out = tmp_path / "search"
    code, stdout, err = run_cli(monkeypatch, capsys, "search", "--model", "unet", "--budget", "psnr>=20", "--steps",
                                "4", "--time", "20s", "--pairs", "1", "--out", out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    sizes = err.split("images per class or prompt: ")[1]
    per_class, held = int(sizes.split(" for calibration")[0]), int(sizes.split(", ")[1].split(" held-out")[0])
    assert summary["strategy"] == "joint" and 2 <= per_class <= 8 and summary["calib_images"] == 6 * per_class
    assert 1 <= held <= 4 and summary["heldout_images"] == 6 * held


def test_the_cli_strategy_is_nsga2_only_for_the_options_only_nsga2_uses():
    assert default_strategy(None, None, None, "fake") == "joint"
    assert default_strategy(None, None, "w8a8", "int8-dynamic") == "joint"  # tried on the plan chosen by MACs
    assert default_strategy(12, None, None, "fake") == "nsga2"
    assert default_strategy(None, "8,4", "w8a8", "fake") == "nsga2"
    assert default_strategy(None, None, "w8a8", "fake") == "nsga2"


def test_the_cli_refuses_nsga2_options_given_to_another_strategy(monkeypatch, capsys, tmp_path):
    """``--strategy dp --trials 5`` ran the dp strategy and ignored the trials without a word."""
    code, _, err = run_cli(monkeypatch, capsys, "search", "--model", "unet", "--strategy", "dp", "--trials", "5",
                           "--out", tmp_path / "s")
    assert code != 0 and "--trials only apply to --strategy nsga2, not dp" in err and not (tmp_path / "s").exists()


def test_the_calibration_and_held_out_sets_grow_with_the_time_limit_between_their_bounds(pipes):
    lines, runs = [], []
    one_each = shapes_workload(list(range(6)), PROBE_STEPS, per_class=1)

    def probe():
        runs.append(1)
        one_each(pipes[0])

    low = (CALIBRATION_PER_CLASS[0], HELDOUT_PER_CLASS[0])
    high = (CALIBRATION_PER_CLASS[1], HELDOUT_PER_CLASS[1])
    assert affordable_sizes(probe, STEPS, 1e-3, 3, log=lines.append) == low
    assert affordable_sizes(probe, STEPS, 1e9, 3, log=lines.append) == high
    assert affordable_sizes(probe, STEPS, 1e9, 3, calibration=3, log=lines.append) == (3, high[1])
    assert len(runs) == 3 and all(f"a {STEPS}-step run of one each" in line for line in lines)
    assert affordable_sizes(probe, STEPS, None, 3) == high and affordable_sizes(probe, STEPS, 1e9, 3, 5, 2) == (5, 2)
    assert len(runs) == 3  # nothing left to size: no timed run

    def broken():
        raise RuntimeError("a pipeline that cannot run")

    assert affordable_sizes(broken, STEPS, 1e9, 3, log=lines.append) == low
    assert "timed run failed: RuntimeError" in lines[-1]


# -- joint cache + quantization search ------------------------------------------------------------------
@pytest.fixture(scope="module")
def w8_spec(pipes, tmp_path_factory):
    from diffaccel.calibration.record import activation_ranges
    from diffaccel.quant.spec import QuantSpec

    path = activation_ranges(pipes[0], calib(), progress=False).save(
        tmp_path_factory.mktemp("joint") / "dit.safetensors")
    return QuantSpec(weight_bits=8, act_bits=8, calibration=str(path))


def test_joint_space_adds_a_bit_width_per_unit(pipes, w8_spec):
    model = pipes[0].denoiser
    space = Space(model, STEPS, quant=w8_spec, bits=(8, 4))
    assert len(space.param_names) == STEPS - 1 + len(space.units)
    genome = space.complete(["all"] * (STEPS - 1))[:-1] + ("4",)
    plan = space.plan(genome)
    assert plan.quant.overrides == {f"{space.unit_paths[-1]}.*": 4} and plan.schedule == space.rows(genome)
    macs = [100.0] + [20.0] * len(space.units)  # 80 MACs in the units, 20 outside
    full = space.bit_mac_fraction(space.all_compute(), macs)
    assert full == pytest.approx(8 / 32)  # W8 everywhere: a quarter of the fp32 bit-operations
    assert space.bit_mac_fraction(genome, macs) < full  # reuse and 4-bit weights both cut the estimate
    with pytest.raises(ValueError):
        Space(model, STEPS, bits=(8, 4))  # per-unit bits need a spec
    with pytest.raises(ValueError):
        Space(model, STEPS, quant=w8_spec.model_copy(update={"backend": "int8"}), bits=(8, 4))
    with pytest.raises(ValueError):
        Space(model, STEPS, quant=w8_spec, bits=(8, 1))


def test_quantization_error_moves_the_dp_key_steps():
    d = np.triu(np.full((6, 6), 1.0), 1)  # every reuse costs the same: any key steps tie
    plain, _ = optimal_keys(d, 3)
    q = np.array([0.0, 0.0, 9.0, 9.0, 0.0, 0.0])  # but steps 2 and 3 quantize badly
    keys, cost = optimal_keys(d, 3, q)
    assert not {2, 3} & set(keys) and keys[0] == 0
    served = [max(j for j in keys if j <= i) for i in range(6)]
    assert cost == pytest.approx(sum(d[served[i], i] for i in range(6) if i not in keys) +
                                 sum(q[served[i]] for i in range(6)))


@pytest.mark.parametrize("strategy", ["dp", "nsga2"])
def test_joint_search_quantizes_its_plans_and_ranks_them_by_bit_operations(pipes, w8_spec, tmp_path, strategy):
    result = search(pipes[0], calib(), budget="psnr>=15", strategy=strategy, trials=12, population=4,
                    objective="bops", quant=w8_spec, bits=(8, 4) if strategy == "nsga2" else None, out=tmp_path,
                    log=quiet)
    s = result.summary
    assert result.plan.quant is not None and result.plan.quant.act_bits == 8
    assert s["bops_fraction"] <= 0.25 * s["mac_fraction"] + 1e-9  # W8 at most: a quarter of fp32 per MAC
    assert set(s["quant"]["unit_bits"].values()) <= {8, 4}
    # the hand-made plans it is compared with run at the same quantization, so they carry a cost too
    assert json.loads((tmp_path / "front.json").read_text())["handmade"][0]["bops_fraction"] is not None
    with diffaccel.accelerate(pipes[0], Plan.load(tmp_path / "plan.json")) as run:
        calib()(pipes[0])
    assert run.stats.reused > 0
    with pytest.raises(diffaccel.search.SearchError):
        search(pipes[0], calib(), objective="bops", out=tmp_path / "plain", log=quiet)


def test_a_search_by_bit_operations_can_return_the_quantization_alone(pipes, w8_spec, tmp_path):
    """Under a budget no caching plan meets, the quantized all-compute plan still saves bit-ops: it had been
    dropped as a plan that "saves no work" (judged by MACs whatever the objective), and was no seed."""
    hand = handmade_plans(pipes[0].transformer, STEPS, w8_spec, quant_alone=True)
    assert hand[0].name == "quantization alone" and set("".join(hand[0].plan.schedule)) == {"C"}
    assert all(h.plan.quant == w8_spec for h in hand)
    result = search(pipes[0], calib(), budget="psnr>=40", strategy="dp", objective="bops", quant=w8_spec,
                    out=tmp_path, log=quiet, validate=False)  # the caching plans reach 35 dB at most here
    alone = [c for c in json.loads((tmp_path / "front.json").read_text())["handmade"]
             if c["name"] == "quantization alone"]
    assert len(alone) == 1 and alone[0]["mac_fraction"] == 1.0 and alone[0]["bops_fraction"] == pytest.approx(0.25)
    assert alone[0]["calib_psnr"] > 40 and result.plan.params["budget_met"]
    assert result.summary["bops_fraction"] <= 0.25  # the cheapest plan that meets it, the quantization alone at most


def test_search_can_fit_a_feature_correction_to_the_chosen_plan(pipes, tmp_path):
    result = search(pipes[0], calib(), budget="psnr>=15", strategy="dp", correct=True, out=tmp_path,
                    heldout=heldout(), pairs=1, log=quiet)
    assert result.summary["feature_correction"] is True and result.summary["calib_psnr_corrected"] > 0
    saved = Plan.load(tmp_path / "plan.json")
    reused = sum(a != "C" for row in saved.schedule for a in row)
    assert saved.feature_correction is not None and len(saved.feature_correction.fits) == reused


def _claimed(plan, psnr: float, macs: float, source: str) -> Candidate:
    """A candidate that claims ``psnr`` on calibration, whatever its plan really does."""
    return Candidate(None, [], psnr, psnr, 1.0, macs, macs, source, plan=plan, psnr_p5=psnr)


def test_validation_refuses_a_plan_flattered_by_its_calibration_score_and_takes_the_next(pipes):
    """On diffusers' StableDiffusionPipeline (PNDM, tiny, random): a cheap plan that claims 99 dB on
    calibration but loses quality on fresh seeds is refused; the next one, which meets the budget
    there by its mean's error bound, is chosen. When none meets it, the best one there is returned
    and the log says so."""
    pipe, kwargs = build_case("sd-pndm")
    calib = CalibrationRun(pipe, as_workload([kwargs]))
    steps = calib.num_steps
    rough, rougher = methods.fora(pipe, steps, interval=2), methods.fora(pipe, steps, interval=steps)
    exact = identity_plan(pipe.unet)
    lines: list[str] = []
    foreign = methods.fora(pipes[0].denoiser, STEPS, interval=2)  # a DiT's plan: fails on this U-Net, is passed by

    def validated(budget: str, candidates: list[Candidate]):
        return validate(Validator(calib, parse_budget(budget), plan_getter(None), lines.append), candidates, None)

    found = validated("psnr>=60", [_claimed(foreign, 99, 0.1, "foreign"), _claimed(rough, 99, 0.5, "rough"),
                                   _claimed(exact, 99, 1.0, "exact")])
    assert any("foreign: failed on validation" in line for line in lines)
    assert [t["source"] for t in found.tried] == ["rough", "exact"] and not found.tried[0]["met"]
    assert found.confirmed and found.chosen.source == "exact" and found.tried[1]["psnr"] == 100.0
    assert found.tried[0]["psnr"] < 60 and found.images == len(calib.reference)
    assert found.tried[0]["psnr"] != pytest.approx(calib.score(rough).psnr, abs=1e-6)  # other seeds than calibration's
    first = found.tried[0]  # a mean that clears the budget by less than its error bound is not confirmed
    edge = validated(f"psnr>={first['psnr'] - first['bound'] / 2}", [_claimed(rough, 99, 0.5, "rough")])
    assert first["bound"] > 0 and not edge.confirmed and edge.chosen.source == "rough"
    # a tail bound is checked on copies of the calls with other seeds, up to TAIL_IMAGES images, by a
    # lower confidence bound on the 5th percentile: on up to 92 images the worst one, so a bound between
    # the worst image and the images' own 5th percentile refuses
    loose = validated("psnr>=1,psnr_p5>=0", [_claimed(rough, 99, 0.5, "rough")])
    tail = loose.tried[0]
    copies = min(MAX_COPIES, -(-TAIL_IMAGES // len(calib.reference)))
    assert copies > 1 and loose.images == copies * len(calib.reference) <= 92
    assert any(f"scored on {loose.images} fresh" in line and tail_text(loose.images) in line
               and "their worst image, at only" in line for line in lines)  # too few for 95%: the log says so
    assert tail["psnr_min"] < tail["psnr_p5"] and tail["psnr_p5_bound"] == pytest.approx(tail["psnr_min"])
    between = validated(f"psnr>=1,psnr_p5>={(tail['psnr_min'] + tail['psnr_p5']) / 2}",
                        [_claimed(rough, 99, 0.5, "rough")])
    under = validated(f"psnr>=1,psnr_p5>={tail['psnr_min'] - 0.01}", [_claimed(rough, 99, 0.5, "rough")])
    assert not between.confirmed and under.confirmed
    assert under.summary()["validation_psnr_p5_bound"] == pytest.approx(tail["psnr_min"])
    tailed = Validator(calib, parse_budget("psnr>=1,psnr_p5>=0"), plan_getter(None), lines.append)
    seeds = [seed for call in tailed.workload.calls for seed in call.seeds]
    assert len(set(seeds)) == len(seeds) and not set(seeds) & {s for c in calib.calibrate.calls for s in c.seeds}
    plain = Validator(calib, parse_budget("psnr>=1"), plan_getter(None), lines.append)
    assert plain.copies == 1 and tailed.reserve() == pytest.approx(copies * plain.reserve())
    tailed.seconds = 1e9  # the share kept for the final validation grows with the copies too
    assert tailed.reserve_used() == pytest.approx(tailed.reserve() - FINAL_SHARE * calib.seconds * copies)
    assert any("p5 at least" in line and "% confidence" in line for line in lines)
    found = validated("psnr>=200", [_claimed(rougher, 99, 0.2, "rougher"), _claimed(rough, 99, 0.5, "rough")])
    best = max(found.tried, key=lambda t: t["psnr"])["source"]
    assert not found.confirmed and found.chosen.source == best and len(found.tried) == 2
    assert found.summary()["validation_psnr"] == max(t["psnr"] for t in found.tried)
    assert any("no plan tried met" in line for line in lines)
    assert untouched(pipe.unet) and isinstance(pipe.scheduler, PNDMScheduler)
    validator = Validator(calib, parse_budget("psnr>=60"), plan_getter(None), lines.append)
    once = validator.check(_claimed(rough, 99, 0.5, "rough"))
    assert validator.check(_claimed(rough, 50, 0.5, "the same plan")) is once  # each plan is run once
    assert validator.confirmed(_claimed(exact, 99, 1.0, "exact"))
    assert not validator.confirmed(_claimed(rough, 99, 0.5, "rough"))
    callable_calib = CalibrationRun(pipe, lambda p: p(**kwargs, output_type="pt").images)
    assert validator_for(callable_calib, parse_budget("psnr>=60"), plan_getter(None), lines.append) is None
    assert "validation skipped" in lines[-1]


class _ExactJudge:
    """Reads an image as right only when it equals the first image it judged of the same seeds (the
    unaccelerated run's): any plan that changes pixels loses every image."""

    def __init__(self):
        self.seen: dict[int, torch.Tensor] = {}
        self.workloads: list[Workload] = []

    def __call__(self, images, workload):
        self.workloads.append(workload)
        per_call = len(images) // len(workload.calls)  # a call may draw several images from its seeds
        seeds = [(call.seeds, j) for call in workload.calls for j in range(per_call)]
        for seed, image in zip(seeds, images):
            self.seen.setdefault(seed, image.clone())
        return torch.tensor([bool((image - self.seen[seed]).abs().max() < 1e-6) for seed, image in zip(seeds, images)])


def test_a_judge_budget_refuses_a_plan_that_loses_the_judged_share_on_more_images(pipes):
    """On diffusers' StableDiffusionPipeline (PNDM, tiny, random): under ``judge>=-1`` a plan confirmed
    by PSNR on the validation seeds is also judged on about ``judge_images`` more images (the
    calibration calls, other seeds) against the unaccelerated ones; one whose judged share falls by
    more than a point is refused and the next is taken. A judge that returns the wrong number of
    verdicts, or values outside [0, 1], is a clear error."""
    pipe, kwargs = build_case("sd-pndm")
    calib = CalibrationRun(pipe, as_workload([kwargs]))
    rough, exact = methods.fora(pipe, calib.num_steps, interval=2), identity_plan(pipe.unet)
    lines: list[str] = []
    judge = _ExactJudge()
    budget = parse_budget("psnr>=1,judge>=-1")
    checked = JudgedCheck(calib, judge, budget.judge, 5, lines.append)
    validator = Validator(calib, budget, plan_getter(None), lines.append, checked)
    found = validate(validator, [_claimed(rough, 99, 0.5, "rough"), _claimed(exact, 99, 1.0, "exact")], None)
    rough_record, exact_record = found.tried
    assert rough_record["psnr"] >= 1 and not rough_record["met"]  # PSNR holds, the judge refuses
    lost = rough_record["judged"]
    assert lost["change"] == -1.0 and lost["flips"] == lost["images"]
    assert found.confirmed and found.chosen.source == "exact" and exact_record["judged"]["change"] == 0.0
    images = len(calib.reference)
    assert exact_record["judged"]["images"] == images * -(-5 // images) >= 5  # whole copies of the calls
    seeds = [s for call in judge.workloads[0].calls for s in call.seeds]
    assert len(set(seeds)) == len(seeds) and not set(seeds) & set(calib.calibrate.calls[0].seeds)
    assert found.summary()["judged"]["change"] == 0.0
    # the judge's checks are kept back in the time limit with the validation's, and given back when made early
    kept = validation_seconds(calib)
    assert validator.reserve() == pytest.approx(kept + checked.seconds()) and checked.seconds() > 0
    validator.seconds = 1e9  # all of it but what the validation after the search needs
    assert validator.reserve_used() == pytest.approx(validator.reserve() - FINAL_SHARE * calib.seconds)
    assert any("judged -100.0 points" in line and "refused" in line for line in lines)
    assert exact_record["judged"]["bound"] == 0.0  # no image changed: nothing to doubt
    # a change whose interval does not secure the bound is refused: 1 of 12 images won back
    flipping = JudgedCheck(calib, lambda images, w: torch.ones(len(images)), 0, 12, quiet)
    flipping._references = [torch.tensor([1.0] * 11 + [0.0])]  # one stage: 12 images
    record = flipping.check(exact, "judged noisily")  # every image right, one more than the reference
    assert record["change"] > 0 > record["bound"] and not record["met"]
    assert exact_record["judged"]["bound"] == 0.0  # no image changed: nothing to doubt
    # a change above the bound that its interval does not secure is refused: 1 of 12 images lost, 1 won
    flipping = JudgedCheck(calib, lambda images, w: torch.ones(len(images)), -1, 12, quiet)
    flipping._references = [torch.tensor([1.0] * 11 + [0.0])]  # one stage: 12 images
    record = flipping.check(exact, "judged noisily")  # its verdicts: all right; against the doctored reference
    assert record["change"] > 0 and record["bound"] < record["change"]
    assert untouched(pipe.unet) and isinstance(pipe.scheduler, PNDMScheduler)
    for bad, message in ((lambda images, w: torch.ones(len(images) + 1), "one per image"),
                         (lambda images, w: torch.full((len(images),), 2.0), r"in \[0, 1\]"),
                         (lambda images, w: 1 / 0, "the judge failed")):
        with pytest.raises(SearchError, match=message):
            JudgedCheck(calib, bad, -1, 2, quiet).reference  # noqa: B018 -- the unaccelerated run judges first
    with pytest.raises(SearchError, match="no judge was given"):
        search(pipe, as_workload([kwargs]), budget="psnr>=1,judge>=-1", strategy="dp", log=quiet)
    with pytest.raises(SearchError, match="as a Workload"):
        search(pipe, lambda p: p(**kwargs, output_type="pt").images, budget="psnr>=1,judge>=-1", strategy="dp",
               judge=judge, log=quiet)


def test_a_judged_check_stops_a_plan_that_cannot_reach_the_bound_after_its_first_stage(pipes, monkeypatch):
    """The judge's images come in stages of whole copies of the calibration calls, each stage's
    unaccelerated run made when a plan first reaches it; a plan that could pass only if the images
    still to judge changed far less than those judged is refused there (``chance_to_pass``), and one
    that keeps its verdicts runs every stage, on the same images as one unstaged run."""
    monkeypatch.setattr(judged_module, "STAGE_IMAGES", 1)  # the tiny pipeline draws a few images a copy
    pipe, kwargs = build_case("sd-pndm")
    calib = CalibrationRun(pipe, as_workload([kwargs]))
    rough = methods.fora(pipe, calib.num_steps, interval=2)
    few = JudgedCheck(calib, _ExactJudge(), -1, 5 * len(calib.reference), quiet)
    assert len(calib.reference) < judged_module.MIN_FLIPS  # the first stage's few flips are too few to stop on
    assert few.check(rough, "rough")["images"] > len(few.stages[0].run(pipe))
    monkeypatch.setattr(judged_module, "MIN_FLIPS", 1)
    judge, lines = _ExactJudge(), []
    checked = JudgedCheck(calib, judge, -1, 5 * len(calib.reference), lines.append)
    assert len(checked.stages) == 4 and checked.total == 5 * len(calib.reference)
    lost = checked.check(rough, "rough")
    assert lost["stopped"] and not lost["met"] and lost["change"] == -1.0
    assert lost["images"] == len(checked.stages[0].run(pipe)) < checked.total
    assert checked._references[1:] == [None] * 3  # the later stages' unaccelerated runs were not made
    assert any("stopped, it cannot reach the bound" in line for line in lines)
    kept = checked.check(identity_plan(pipe.unet), "exact")
    assert kept["met"] and not kept["stopped"] and kept["images"] == checked.total and kept["change"] == 0.0
    staged = [call.seeds for stage in checked.stages for call in stage.calls]
    assert staged == [call.seeds for call in checked.workload.calls]  # the stages, in order
    assert len(judge.workloads) == 2 + 1 + 2 * 3  # stage 1: reference, rough, exact; then the reference and exact
    assert untouched(pipe.unet) and isinstance(pipe.scheduler, PNDMScheduler)


def test_the_chance_to_pass_follows_the_changes_judged_so_far():
    """Conditional power under the current trend: a plan 2.8 points down on 144 of 624 images with 8
    flips (a PixArt key-step plan) has almost no chance; one at +0.0 keeps a fair one; without a
    spread the change decides alone."""
    def change(flips_down: int, flips_up: int, images: int) -> dict:
        same = images - flips_down - flips_up
        return paired_change(torch.tensor([0.0] * flips_down + [1.0] * flips_up + [1.0] * same),
                             torch.tensor([1.0] * flips_down + [0.0] * flips_up + [1.0] * same))

    assert chance_to_pass(change(6, 2, 144), 144, 624, -1) < judged_module.FUTILITY
    assert chance_to_pass(change(4, 4, 144), 144, 624, -1) > 0.15
    assert chance_to_pass(change(4, 4, 144), 144, 624, -1) < chance_to_pass(change(2, 6, 144), 144, 624, -1)
    assert chance_to_pass(change(0, 0, 144), 144, 624, -1) == 1.0
    assert chance_to_pass(change(144, 0, 144), 144, 624, -1) == 0.0


def test_a_search_under_a_judge_budget_reports_the_judged_change(pipes):
    lines: list[str] = []
    result = search(pipes[0], calib(), budget="psnr>=20,judge>=-1", strategy="greedy", greedy_points=4,
                    heldout=heldout(), pairs=1, judge=lambda images, w: torch.ones(len(images)), judge_images=4,
                    log=lines.append)
    s = result.summary
    assert s["judged"] is not None and s["judged"]["change"] == 0.0 and s["judged"]["images"] == 4
    assert s["heldout_judged"]["change"] == 0.0 and s["budget"] == "psnr>=20,judge>=-1"
    assert any(line.startswith("judge: up to 4 images") for line in lines)
    assert "judged +0.0 pt on 4 images" in summary_line(s)


def test_the_tail_bound_is_an_order_statistic_that_holds_with_the_stated_confidence():
    """The bound on the 5th percentile is the k-th smallest value, k the largest whose chance of lying
    under the true 5th percentile reaches 95%; the worst value on up to 92. Checked against its
    definition by drawing: over many samples of 100 uniform values, it lies under 0.05 at least 95% of
    the time, and the samples' own 5th percentile does not."""
    assert tail_lower_bound([3.0, 1.0, 2.0]) == (1.0, pytest.approx(1 - 0.95 ** 3))
    bound, held = tail_lower_bound([float(v) for v in range(48)])
    assert bound == 0.0 and held == pytest.approx(1 - 0.95 ** 48) and held >= 0.9
    bound, held = tail_lower_bound([float(v) for v in range(600)])
    assert 0 < bound < 29 and held >= 0.9  # under the sample's own 5th percentile (29.95)
    generator = torch.Generator().manual_seed(0)
    draws = torch.rand(2000, 100, generator=generator)
    bounds = torch.tensor([tail_lower_bound(row.tolist())[0] for row in draws])
    own = torch.quantile(draws, 0.05, dim=1)
    assert float((bounds <= 0.05).float().mean()) >= 0.95 > float((own <= 0.05).float().mean())
    assert tail_lower_bound([float(v) for v in range(93)]) == (1.0, pytest.approx(0.95, abs=1e-3))  # the 2nd worst
    with pytest.raises(ValueError):
        tail_lower_bound([])


def test_the_validation_says_when_its_images_hold_the_tail_bound_at_less_than_95_percent():
    """Under 59 images the bound is their worst at less than 95%: the log says so, and how to fix it."""
    assert tail_text(96) == " and a 95% lower confidence bound on their 5th percentile"
    assert tail_text(59) == tail_text(96)  # the worst of 59 holds at 95% already
    few = tail_text(32)
    assert "their worst image, at only 80.6% confidence (95% needs 59 images" in few
    assert "more calibration images" in few


def test_validation_keeps_a_dearer_plan_the_search_confirmed_and_bounds_nothing_on_one_image(pipes):
    """The final validation measures at most ``MAX_VALIDATED`` cheaper plans, but a plan the search
    already confirmed as it went is still the one returned when they all miss; one validation
    image has no spread to bound its mean by, so it confirms nothing."""
    pipe, kwargs = build_case("sd-pndm")
    calib = CalibrationRun(pipe, as_workload([kwargs]))
    steps = calib.num_steps
    rough, exact = methods.fora(pipe, steps, interval=steps), identity_plan(pipe.unet)
    validator = Validator(calib, parse_budget("psnr>=60"), plan_getter(None), quiet)
    dear = _claimed(exact, 99, 1.0, "exact")
    assert validator.confirmed(dear)  # measured during the search
    cheap = [_claimed(rough.model_copy(update={"params": {"copy": i}}), 99, 0.2, f"rough {i}")
             for i in range(MAX_VALIDATED + 1)]
    found = validate(validator, [*cheap, dear], None)
    assert found.confirmed and found.chosen is dear
    assert [t["source"] for t in found.tried] == [c.source for c in cheap[:MAX_VALIDATED]] + ["exact"]
    # a hand-made seed past the cheaper plans' checks is checked too (it need not have been measured)
    seed = _claimed(exact.model_copy(update={"params": {"seed": True}}), 99, 0.9, "hand-made exact")
    fresh = Validator(calib, parse_budget("psnr>=60"), plan_getter(None), quiet)
    assert validate(fresh, [*cheap, seed], None).chosen is not seed  # without it: unchecked, not chosen
    seeded = validate(fresh, [*cheap, seed], None, seeds=[seed])
    assert seeded.confirmed and seeded.chosen is seed and seeded.tried[-1]["source"] == "hand-made exact"
    lines: list[str] = []
    one = CalibrationRun(pipe, as_workload([{**kwargs, "prompt": kwargs["prompt"][:1]}]))
    assert len(one.reference) == 1
    record = Validator(one, parse_budget("psnr>=60"), plan_getter(None), lines.append).check(dear)
    assert record["psnr"] == 100.0 and record["bound"] is None and not record["met"]
    assert "error bound none from one image" in lines[-1]


def test_a_search_validates_its_choice_unless_told_not_to(pipes):
    lines: list[str] = []
    checked = search(pipes[0], calib(), budget="psnr>=20", strategy="greedy", greedy_points=4, log=lines.append)
    plain = search(pipes[0], calib(), budget="psnr>=20", strategy="greedy", greedy_points=4, validate=False, log=quiet)
    tried = checked.summary["validation_tried"]
    assert tried and checked.summary["validation_images"] == 2 and any(line.startswith("validation:") for line in lines)
    assert plain.summary["validation_confirmed"] is None and "validation_tried" not in plain.summary
    assert plain.chosen.source == tried[0]["source"]  # unvalidated: the cheapest that cleared, the first one tried
    if checked.summary["validation_confirmed"]:
        assert checked.chosen.source == tried[-1]["source"] and checked.summary["validation_psnr"] >= 20


def test_a_resumed_search_logs_the_image_counts_it_runs_with(tmp_path):
    """The log of a search resumed in a folder gave the stored counts even where the command gave its own
    (``--calib-per-class 1`` logged "2 for calibration"); it gives the ones used."""
    (tmp_path / SIZES_FILE).write_text(json.dumps({"calibration": 2, "heldout": 3}))
    lines: list[str] = []
    assert kept_sizes(tmp_path, (1, None), lines.append) == (1, 3)
    assert "1 for calibration, 3 held-out (held-out as the search" in lines[-1]
    assert kept_sizes(tmp_path, (None, None), lines.append) == (2, 3) and "(both as" in lines[-1]
    assert kept_sizes(tmp_path, (4, 5), lines.append) == (4, 5) and len(lines) == 2


def test_a_plan_the_validation_did_not_confirm_is_returned_with_a_warning(pipes):
    """A plan that cleared the budget on calibration but that the validation seeds refused (the best
    of those tried is returned) had come back with budget_met true and no warning: only a log line,
    off by default, said "not confirmed"."""
    plan, budget = identity_plan(pipes[0].transformer), parse_budget("psnr>=30")
    summary = {"met": True, "heldout_met": None, "validation_confirmed": False}
    with pytest.warns(SearchWarning, match="validation seeds"):
        unconfirmed = marked(plan, summary, budget)
    assert unconfirmed.params["validation_confirmed"] is False and unconfirmed.params["budget_met"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        confirmed = marked(plan, {**summary, "validation_confirmed": True}, budget)
    assert confirmed.params["validation_confirmed"] is True


def test_the_validation_and_judge_copies_of_the_embedded_models_seeds_stay_in_range():
    """The embedded models' seeds are hashed up to 2**63 - 1: the copies that a tail bound's
    validation and a judge run (seeds shifted by the calibration seeds' whole span per copy) once
    went past what torch.Generator takes, and the search died at its validation. They wrap around,
    every seed distinct."""
    calib = shapes_workload(list(range(6)), per_class=8)
    judge = judged_module.JUDGE_SEED_OFFSET
    for copies in (calib.repeated(4, VALIDATION_SEED_OFFSET, "v"), calib.repeated(13, judge, "j"), calib.reseeded()):
        seeds = [s for call in copies.calls for s in call.seeds]
        assert all(0 <= s < 2 ** 63 for s in seeds) and len(set(seeds)) == len(seeds)
        assert not set(seeds) & {s for call in calib.calls for s in call.seeds}
        for s in (min(seeds), max(seeds)):
            torch.Generator().manual_seed(s)


def test_find_plan_refuses_up_front_what_would_fail_at_its_end(tmp_path):
    """A budget that is not text, an out= that is a file, and held-out calls at another step count
    than the calibration calls (which once ran the whole search, then died at the held-out check with
    the plan unwritten) are one-line errors before any work."""
    pipe, kwargs = build_case("dit")
    calls = [{**kwargs, "seed": i} for i in range(2)]
    with pytest.raises(BudgetError, match="a budget is text such as 'psnr>=30'"):
        diffaccel.find_plan(pipe, calls=calls, budget=30)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SearchError, match="is a file: give a folder"):
        diffaccel.find_plan(pipe, calls=calls, out=tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    started = time.time()
    with pytest.raises(SearchError, match="held-out calls ask for 12 steps and the calibration calls for 6"):
        diffaccel.find_plan(pipe, calls=calls, heldout=[{**c, "num_inference_steps": 12} for c in calls],
                            out=tmp_path / "search")
    assert time.time() - started < 5 and not (tmp_path / "search").exists()

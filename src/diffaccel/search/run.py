"""Orchestration: calibration run, one strategy, the front, the chosen plan, the held-out check
against the best hand-made plan, and the output files.

Outputs (``out``): ``plan.json`` (the cheapest plan meeting the budget on the calibration set;
``diffaccel generate --plan`` runs it), ``front.json`` (the strategy's Pareto front over quality
and cost, with the hand-made plans), ``front.png`` and ``summary.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from diffaccel.calibration.reference import Calibrate, CalibrationRun
from diffaccel.calibration.workload import Workload, as_calibration, as_workload, calibration_workload
from diffaccel.errors import SearchError
from diffaccel.methods.feature_correction import fit_feature_correction
from diffaccel.plan import Plan
from diffaccel.search.candidates import Candidate, candidates_of, choose, handmade_scores, ordered, pareto
from diffaccel.search.config import CORRECTION_SEED_OFFSET, Budget, SearchConfig, auto_margin, configured
from diffaccel.search.context import Context
from diffaccel.search.dp import dp_candidates
from diffaccel.search.greedy import greedy_candidates
from diffaccel.search.handmade import handmade_plans
from diffaccel.search.heldout import check_heldout_steps, heldout_check, heldout_reserve
from diffaccel.search.joint import JointSearch
from diffaccel.search.judged import Judge, check_judge, judged_for
from diffaccel.search.nsga import ClockSeededNSGAII, run_list, run_nsga
from diffaccel.search.outputs import output_folder, write_outputs
from diffaccel.search.precision import lower_precision
from diffaccel.search.result import SearchResult, marked
from diffaccel.search.space import Genome, Space
from diffaccel.search.store import Store, study_key
from diffaccel.search.validation import Validation, Validator, plan_getter, validate, validator_for

LOG = logging.getLogger("diffaccel")


def study_name(model_name: str, budget: Budget, objective: str, strategy: str, seed: int) -> str:
    return f"{model_name}|{budget.text}|{objective}|{strategy}|seed{seed}"


def search(pipe: Any, calibrate: Calibrate, config: SearchConfig | None = None, *, out: str | Path | None = None,
           storage: str | None = None, heldout: Calibrate | None = None, denoiser: str | None = None,
           log: Callable[[str], None] = LOG.info, started: float | None = None, judge: Judge | None = None,
           **options: Any) -> SearchResult:
    """Search static plans for ``pipe``'s denoiser on the calibration set ``calibrate`` (a
    ``Workload``, or a callable running the pipeline on fixed inputs and returning images in [0, 1]).

    ``config`` (or the same settings as keywords, ``SearchConfig``'s fields) says what to find.
    ``out``: folder of the outputs and of the default storage ``sqlite:///out/study.db``;
    ``storage``: any optuna storage URL instead (several workers may share it). ``heldout``: a second
    set, on evaluation seeds, on which the chosen and the best hand-made plans are re-measured
    against the unaccelerated pipeline (``config.pairs`` interleaved runs each). Before that, the
    pick is confirmed on fresh calibration seeds (``validation.py``; ``config.validate``). ``started``:
    when the time limit's clock started (default now; the command line passes its own start, so that
    loading the pipeline counts). ``judge``: ``(images, workload) -> a verdict in [0, 1] per image``,
    for ``judge>=X`` and ``heldout_judged`` (``judged.py``)."""
    started = time.time() if started is None else started
    calibrate, heldout = as_calibration(calibrate, pipe), as_calibration(heldout, pipe)
    config = configured(config, options)
    config.check()
    budget = config.parsed_budget()
    check_judge(budget, judge, calibrate)  # before any work, as the settings are
    check_heldout_steps(calibrate, heldout)
    out = output_folder(out)
    calib = CalibrationRun(pipe, calibrate, config.granularity, denoiser)
    try:
        space = Space(calib.model, calib.num_steps, config.granularity, config.searched_quant(), config.bits)
    except ValueError as exc:
        raise SearchError(str(exc)) from None
    config.check_k_values(space.num_steps)
    own_file = storage is None and out is not None  # the default storage: one search of one model
    if own_file:
        storage = f"sqlite:///{(out / 'study.db').resolve()}"
    name = config.model_name or space.adapter.name
    calib_id = config.calibration_id or getattr(calibrate, "description", None) \
        or getattr(calibrate, "__name__", "custom")
    if isinstance(calibrate, Workload) and config.calibration_id is None:  # the calls themselves, not their count
        calib_id += f" | calls {calibrate.fingerprint()}"
    if space.quant is not None:  # a quantized search is another search: its storage must not mix with a plain one
        calib_id += f" | quant {space.quant.model_dump_json(exclude={'calibration'})} bits {list(space.bits)}"
    sampler = ClockSeededNSGAII(seed=config.seed, population_size=config.population) \
        if config.strategy == "nsga2" else None
    store = Store(storage, study_name(name, budget, config.objective, config.strategy, config.seed), space,
                  study_key(space, calib_id), sampler, check_all_studies=own_file)
    try:
        ctx = Context(config, budget, calib, space, store, out, started, log, judge=judge)
        log(f"search: {name}, {space.num_steps} steps, {len(space.units)} units, strategy {config.strategy}, "
            f"budget {budget.text}, objective {config.objective}; levels {space.describe()}")
        log(f"calibration: {len(calib.reference)} images, full-compute run {calib.seconds:.1f} s")
        return _search(ctx, pipe, heldout, name)
    finally:
        store.close()


def _evaluator(ctx: Context) -> Callable[[Genome], tuple[list[float], dict]]:
    """Scores one genome on the calibration set: ([quality, cost], attributes to store)."""
    space, calib, budget, objective = ctx.space, ctx.calib, ctx.budget, ctx.config.objective

    def evaluate(genome: Genome) -> tuple[list[float], dict]:
        plan = space.plan(genome)
        try:
            s = calib.score(plan)
        except SearchError:
            raise
        except Exception as exc:  # a plan that breaks the model scores worst, deterministically
            macs, latency = calib.fractions(plan)
            return [0.0, 1.0], {"psnr": 0.0, "psnr_min": 0.0, "ssim": 0.0, "mac_fraction": macs,
                                "latency_fraction": latency, "bops_fraction": 1.0, "error": str(exc)[:200]}
        attrs = {"psnr": s.psnr, "psnr_p5": s.psnr_p5, "psnr_min": s.psnr_min, "ssim": s.ssim,
                 "mac_fraction": s.mac_fraction, "latency_fraction": s.latency_fraction, "seconds": round(s.seconds, 3)}
        if space.quant is not None:
            attrs["bops_fraction"] = space.bit_mac_fraction(genome, calib.unit_macs)
        quality = s.psnr if budget.metric == "psnr" else s.ssim
        cost = {"macs": s.mac_fraction, "latency": s.latency_fraction}.get(objective, attrs.get("bops_fraction"))
        return [quality, cost], attrs

    return evaluate


def _run_strategy(ctx: Context, seeds: list[tuple[Genome, str]]) -> int:
    """Evaluate the strategy's candidates until done or the deadline; returns how many this run did."""
    config, space, calib, evaluate = ctx.config, ctx.space, ctx.calib, _evaluator(ctx)
    if config.strategy == "joint":
        joint = JointSearch(calib, ctx.budget.raised(ctx.margin), config.objective, ctx.deadline,
                            ctx.log, quant=config.searched_quant(), validator=ctx.validator, plain=ctx.budget)
        done = joint.run()
        ctx.joint, ctx.quant_speed = joint.candidates, joint.quant_speed
        return done
    if config.strategy == "nsga2":
        return run_nsga(ctx.store, seeds, evaluate, config.trials, ctx.deadline, ctx.log)
    if config.strategy == "dp":
        quant_error = None
        if space.quant is not None:
            quant_error = calib.unit_error(space.plan(space.all_compute()))
            ctx.log(f"quantization error per step (mean over units): {np.round(quant_error.mean(0), 4).tolist()}")
        k_values = list(config.k_values) if config.k_values else None
        return run_list(ctx.store, dp_candidates(space, calib.dissimilarity, k_values, quant_error), evaluate,
                        ctx.deadline, ctx.log)
    unit_costs = calib.unit_macs if config.objective == "macs" else calib.unit_seconds
    return run_list(ctx.store, greedy_candidates(space, calib.dissimilarity, unit_costs, config.greedy_points),
                    evaluate, ctx.deadline, ctx.log)


def _handmade(ctx: Context):
    # compared at the same quantization
    handmade = handmade_plans(ctx.space.model, ctx.space.num_steps, ctx.space.quant, ctx.config.objective != "macs")
    seeds: list[tuple[Genome, str]] = []
    for item in handmade:
        genome = ctx.space.genome(item.plan.schedule)
        if genome is not None and genome not in [g for g, _ in seeds]:
            seeds.append((genome, "seed " + item.key))
    return handmade, seeds


def _search(ctx: Context, pipe: Any, heldout: Calibrate | None, name: str) -> SearchResult:
    config, budget, space, calib = ctx.config, ctx.budget, ctx.space, ctx.calib
    handmade, seeds = _handmade(ctx)
    ctx.validator = _validator(ctx) if config.validate else None
    ctx.keep_back(heldout_reserve(ctx, heldout) + ctx.validation_reserve() + ctx.precision_reserve())
    enough = budget.raised(config.largest_margin())
    ctx.log(f"scoring {len(handmade)} hand-made plans first, cheapest first, up to the first that meets {enough.text} "
            "(the seeds, and what the search must beat)")
    hand = handmade_scores(ctx.store, calib, handmade, space, ctx.deadline, ctx.log, enough,
                           config.objective)  # the seeds first, in time
    ctx.margin = _margin(ctx, hand)
    evaluated = _run_strategy(ctx, seeds)
    if ctx.quant_speed is not None:  # the quantized hand-made plans are as fast as the quantized model
        hand = [replace(c, latency_fraction=c.latency_fraction * ctx.quant_speed) for c in hand]
    searched = [c for c in [*candidates_of(ctx.store, space), *ctx.joint]  # saving work as the objective counts it
                if c.cost(config.objective) < 1.0 - 1e-9 and "error" not in c.extra]
    points = searched + hand  # a hand-made plan that beats every searched one is returned, and said so
    if not points:
        failed = next((c.extra["error"] for c in candidates_of(ctx.store, space) if "error" in c.extra), None)
        raise SearchError(f"every plan the search evaluated failed on this pipeline, the first with: {failed}"
                          if failed else "the search evaluated no plan that saves work (time limit too short?); "
                          "run it again with more time: it continues where it stopped")
    if not searched:
        ctx.log("warning: the time limit ran out on the hand-made plans, before the search proper evaluated anything: "
                "the best hand-made plan is returned; run it again with more time (it continues where it stopped)")
    front = pareto(points, budget, config.objective)
    safe = budget.raised(ctx.margin)
    chosen, met, shortfall = choose(points, safe, config.objective)
    cleared = safe if met else budget
    if not met:  # nothing clears the margin: the cheapest plan meeting the budget itself, if any
        chosen, met, shortfall = choose(points, budget, config.objective)
    validation = _validation(ctx, points, cleared, hand) if met else None
    chosen = validation.chosen if validation is not None else chosen
    from_hand = chosen in hand
    if from_hand and searched:
        ctx.log(f"the best hand-made plan ({chosen.source}) beats every searched plan under {budget.text}: "
                "it is the plan returned")
    if met:
        chosen, validation = _lowered(ctx, chosen, cleared, validation)
    best_hand = choose(hand, budget, config.objective) if hand else None
    plan = _chosen_plan(ctx, chosen)
    summary = _summary(ctx, name, chosen, met, shortfall, safe, front, evaluated)
    if not met:
        ctx.log(f"no plan that saves work meets {budget.text} on the calibration set; the closest reaches "
                f"{chosen.quality(budget):.4g}{budget.unit()} (short by {summary['shortfall_text']}) at "
                f"{1 / chosen.mac_fraction:.2f}x fewer MACs")
    summary["chosen_is_handmade"] = from_hand
    summary.update(validation.summary() if validation is not None else {"validation_confirmed": None})
    summary["solver"] = plan.solver.label if plan.solver is not None else None
    if plan.feature_correction is not None:
        summary["calib_psnr_corrected"] = plan.params.get("calib_psnr_corrected")
    if best_hand is not None:
        summary["best_handmade"] = _handmade_summary(best_hand)
    heldout_check(ctx, summary, plan, heldout, best_hand, handmade)
    plan = marked(plan, summary, budget)
    result = SearchResult(plan, met, shortfall, chosen, front, hand, summary, ctx.out, points)
    if ctx.out is not None:
        write_outputs(result, budget, config.objective)
        ctx.log(f"wrote {ctx.out / 'plan.json'}, front.json, front.png and summary.json")
    return result


def _validator(ctx: Context) -> Validator | None:
    """What confirms the chosen plan on fresh seeds (``validation.py``), with a judge budget's check."""
    judged = judged_for(ctx.calib, ctx.budget, ctx.judge, ctx.config.judge_images, ctx.log)
    return validator_for(ctx.calib, ctx.budget, plan_getter(ctx.space), ctx.log, judged)


def _validation(ctx: Context, points: list[Candidate], cleared: Budget, hand: list[Candidate]) -> Validation | None:
    """The candidates that cleared ``cleared`` on calibration, cheapest first, validated on fresh
    seeds (``validation.py``); None when the search does not validate."""
    if ctx.validator is None:
        return None
    deadline = None if ctx.deadline is None else ctx.deadline + ctx.validation_reserve()
    return validate(ctx.validator, ordered(points, cleared, ctx.config.objective), deadline, seeds=hand)


def _lowered(ctx: Context, chosen: Candidate, cleared: Budget,
             validation: Validation | None) -> tuple[Candidate, Validation | None]:
    """``chosen`` in cheaper arithmetic if faster within ``cleared`` (``precision.py``), and its validation."""
    deadline = None if ctx.deadline is None else ctx.deadline + ctx.validation_reserve() + ctx.precision_reserve()
    found = lower_precision(ctx.calib, chosen, plan_getter(ctx.space)(chosen), cleared, deadline, ctx.log,
                            ctx.validator, ctx.arithmetic(), ctx.precision_tried)
    if found is None:
        return chosen, validation
    ctx.precision_speed = found[1]
    scores = ctx.validator.check(found[0]) if validation is not None else None  # confirmed: the record is kept
    return found[0], None if validation is None else replace(validation, chosen=found[0], scores=scores)


def _margin(ctx: Context, hand: list[Candidate]) -> float:
    """The margin given, or for a PSNR budget the automatic one (``auto_margin``) from the hand-made plans."""
    if ctx.config.margin is not None or ctx.budget.metric != "psnr":
        return ctx.config.effective_margin()
    images = len(ctx.calib.reference)
    margin = auto_margin([(c.psnr, c.extra.get("psnr_std")) for c in hand], ctx.budget.threshold, images)
    ctx.log(f"margin: {margin:.2f} dB (the 95% error bound of a mean over {images} calibration images; --margin)")
    return margin


def _chosen_plan(ctx: Context, chosen: Candidate) -> Plan:
    config, calib = ctx.config, ctx.calib
    params = {"budget": ctx.budget.text, "objective": config.objective, "strategy": config.strategy,
              "seed": config.seed, "calib_psnr": round(chosen.psnr, 3), "calib_ssim": round(chosen.ssim, 4),
              "mac_fraction": round(chosen.mac_fraction, 4), "trial": chosen.trial, "source": chosen.source}
    if chosen.plan is not None:  # a joint-strategy or hand-made candidate: its plan as scored
        plan = chosen.plan.model_copy(update={"method": f"search-{config.strategy}",
                                              "params": {**chosen.plan.params, **params}})
    else:
        plan = ctx.space.plan(chosen.genome, method=f"search-{config.strategy}", params=params)
    plan = plan.model_copy(update={"calibration": calib.info()})
    if not config.correct:
        return plan
    # fitted on other calibration seeds than the scored ones, so that the calibration PSNR of the
    # corrected plan is not flattered by its own fit
    ctx.log("fitting a per-channel correction of the reused features on other calibration images")
    if not isinstance(calib.calibrate, Workload):
        raise SearchError("a feature correction needs the calibration set as a Workload (pipeline calls)")
    fit_on = calib.calibrate.reseeded(CORRECTION_SEED_OFFSET, "calibration seeds for the correction fit")
    plan = fit_feature_correction(calib.pipe, plan, fit_on)
    corrected = calib.score(plan).psnr
    ctx.log(f"calibration PSNR with the correction: {corrected:.2f} dB (without: {chosen.psnr:.2f} dB)")
    return plan.model_copy(update={"params": {**plan.params, "calib_psnr_corrected": round(corrected, 3)}})


def _summary(ctx: Context, name: str, chosen: Candidate, met: bool, shortfall: float, safe: Budget,
             front: list[Candidate], evaluated: int) -> dict:
    config, space, calib, budget = ctx.config, ctx.space, ctx.calib, ctx.budget
    quant = space.quant if chosen.plan is None else chosen.plan.quant  # a joint plan may be unquantized
    bits = space.unit_bits(chosen.genome) if chosen.genome else [quant.weight_bits if quant else 32] * len(space.units)
    return {
        "model": name, "strategy": config.strategy, "objective": config.objective, "budget": budget.text,
        "seed": config.seed, "margin": ctx.margin, "clears_margin": chosen.meets(safe),
        "num_steps": space.num_steps, "units": space.units, "met": met, "shortfall": shortfall,
        "shortfall_text": ctx.budget.miss_text(chosen.quality(ctx.budget), chosen.psnr_p5),
        "calib_images": len(calib.reference), "calib_psnr": chosen.psnr, "calib_psnr_p5": chosen.psnr_p5,
        "calib_psnr_min": chosen.psnr_min, "calib_ssim": chosen.ssim, "mac_fraction": chosen.mac_fraction,
        "latency_fraction": chosen.latency_fraction, "calib_speedup_macs": 1 / chosen.mac_fraction,
        "source": chosen.source, "trial": chosen.trial,
        "bops_fraction": chosen.bops_fraction, "feature_correction": config.correct, "calib_psnr_corrected": None,
        "quant": None if quant is None else {
            "weight_bits": quant.weight_bits, "act_bits": quant.act_bits, "backend": quant.backend,
            "bit_choices": list(space.bits), "unit_bits": dict(zip(space.units, bits))},
        "trials_complete": ctx.store.n_complete(), "evaluated_this_run": evaluated, "front_size": len(front),
        "search_seconds": round(time.time() - ctx.started, 1),
        "latency_model": "per-unit wall time of the full-compute calibration run (forward hooks), summed over the "
                         "units a plan computes; reuse is taken as free" + ("" if ctx.quant_speed is None else
                         "; quantized plans scaled by the measured quantized / plain wall time of the full run"),
        "quant_speed": ctx.quant_speed, "precision": chosen.plan.precision if chosen.plan is not None else None,
        "precision_speed": ctx.precision_speed, "precision_tried": ctx.precision_tried,
        "unit_macs": calib.unit_macs, "unit_seconds": calib.unit_seconds,
    }


def _handmade_summary(best_hand: tuple[Candidate, bool, float]) -> dict:
    hc, hmet, hshort = best_hand
    return {"name": hc.extra["name"], "settings": hc.extra["settings"], "met": hmet, "shortfall": hshort,
            "calib_psnr": hc.psnr, "calib_ssim": hc.ssim, "mac_fraction": hc.mac_fraction,
            "latency_fraction": hc.latency_fraction, "calib_speedup_macs": 1 / hc.mac_fraction}


def find_plan(pipe: Any, calls: Workload | Iterable[dict] | None = None, budget: str = "psnr>=30",
              strategy: str = "dp", heldout: Workload | Iterable[dict] | bool | None = True,
              out: str | Path | None = None, log: Callable[[str], None] = LOG.info, **options: Any) -> Plan:
    """The plan a search finds for ``pipe`` on ``calls`` (the pipeline calls to calibrate on; the
    embedded pipelines' default workload if None) under ``budget``: the one documented entry point.

    ``heldout``: calls to re-measure the chosen plan on (True: the same calls with other noise
    seeds; None/False: no held-out check). Other options: ``SearchConfig``'s fields, ``storage``,
    ``denoiser``. The full result (front, summary) is in ``out`` when given."""
    workload = calibration_workload(calls, pipe)
    check = workload.reseeded() if heldout is True else (None if heldout in (None, False) else as_workload(heldout))
    return search(pipe, workload, out=out, heldout=check, log=log, budget=budget, strategy=strategy, **options).plan

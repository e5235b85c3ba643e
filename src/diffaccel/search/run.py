"""Orchestration: budget, calibration run, one strategy, the front, the chosen plan, the held-out
check against the best hand-made plan, and the output files.

Outputs (``out``): ``plan.json`` (the cheapest plan meeting the budget on the calibration set;
``diffaccel generate --plan`` runs it), ``front.json`` (the strategy's Pareto front over quality
and cost, with the hand-made plans), ``front.png`` and ``summary.json``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffaccel.plan import Plan
from diffaccel.quant.spec import QuantSpec
from diffaccel.search.errors import BudgetError, SearchError
from diffaccel.search.evaluate import Calibrate, CalibrationRun, compare, denoiser
from diffaccel.search.handmade import handmade_plans
from diffaccel.search.space import Genome, Space
from diffaccel.search.store import Store, fingerprint

STRATEGIES = ("nsga2", "dp", "greedy")
OBJECTIVES = ("macs", "latency", "bops")  # bops: MACs weighted by weight bits (joint searches)
_BUDGET = re.compile(r"^\s*(psnr|ssim)\s*>=\s*([-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    metric: str  # "psnr" (dB) or "ssim"
    threshold: float

    @property
    def text(self) -> str:
        return f"{self.metric}>={self.threshold:g}"

    def met(self, quality: float) -> bool:
        return quality >= self.threshold

    def unit(self) -> str:
        return " dB" if self.metric == "psnr" else ""

    def raised(self, margin: float) -> Budget:
        """The budget the calibration set must meet so that unseen inputs still meet this one."""
        return Budget(self.metric, self.threshold + margin)


# A plan chosen on a dozen calibration images loses some quality on other inputs (about 0.1-0.8 dB
# on the embedded models): by default the calibration set must clear the budget by this much.
DEFAULT_MARGIN = {"psnr": 0.5, "ssim": 0.005}
CORRECTION_SEED_OFFSET = 1000  # the feature correction is fitted on calibration seeds the search never scores


def parse_budget(text: str) -> Budget:
    """``psnr>=X`` (dB, mean over the calibration images) or ``ssim>=X`` (0 < X <= 1)."""
    match = _BUDGET.match(text or "")
    if match is None:
        raise BudgetError(f"cannot read the budget {text!r}: write psnr>=X (dB, e.g. psnr>=30) or ssim>=X "
                          "(e.g. ssim>=0.95)")
    metric, value = match.group(1).lower(), float(match.group(2))
    if metric == "ssim" and not 0 < value <= 1:
        raise BudgetError(f"an SSIM budget must lie in (0, 1], got {value:g}")
    if metric == "psnr" and value <= 0:
        raise BudgetError(f"a PSNR budget must be positive (dB), got {value:g}")
    return Budget(metric, value)


def parse_duration(text: str | None) -> float | None:
    """``90s``, ``15m``, ``2h`` or plain seconds; None or empty for no limit."""
    if text is None or str(text).strip() in ("", "0", "none"):
        return None
    match = re.fullmatch(r"\s*(\d+(\.\d*)?)\s*([smh]?)\s*", str(text))
    if match is None:
        raise SearchError(f"cannot read the time limit {text!r}: write e.g. 90s, 15m or 2h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(3)]


@dataclass
class Candidate:
    genome: Genome | None
    schedule: list[str]
    psnr: float
    psnr_min: float
    ssim: float
    mac_fraction: float
    latency_fraction: float
    source: str
    trial: int | None = None
    extra: dict = field(default_factory=dict)
    bops_fraction: float | None = None  # joint searches: bit-weighted MACs (``Space.bit_mac_fraction``)

    def quality(self, budget: Budget) -> float:
        return self.psnr if budget.metric == "psnr" else self.ssim

    def cost(self, objective: str) -> float:
        if objective == "bops":
            return self.bops_fraction if self.bops_fraction is not None else self.mac_fraction
        return self.mac_fraction if objective == "macs" else self.latency_fraction

    def as_dict(self) -> dict:
        return {"source": self.source, "trial": self.trial, "calib_psnr": self.psnr, "calib_psnr_min": self.psnr_min,
                "calib_ssim": self.ssim, "mac_fraction": self.mac_fraction,
                "latency_fraction": self.latency_fraction, "bops_fraction": self.bops_fraction, **self.extra,
                "schedule": self.schedule}


@dataclass
class SearchResult:
    plan: Plan
    met: bool
    shortfall: float
    chosen: Candidate
    front: list[Candidate]
    handmade: list[Candidate]
    summary: dict
    out: Path | None


def pareto(points: list[Candidate], budget: Budget, objective: str) -> list[Candidate]:
    """Non-dominated candidates (quality up, cost down), cheapest first; duplicates dropped."""
    ordered = sorted(points, key=lambda c: (c.cost(objective), -c.quality(budget), c.trial or 0))
    front: list[Candidate] = []
    best = -math.inf
    for c in ordered:
        if c.quality(budget) > best:
            front.append(c)
            best = c.quality(budget)
    return front


def choose(points: list[Candidate], budget: Budget, objective: str) -> tuple[Candidate, bool, float]:
    """The cheapest candidate meeting the budget; else the best-quality one and its shortfall."""
    meeting = [c for c in points if budget.met(c.quality(budget))]
    if meeting:
        return min(meeting, key=lambda c: (c.cost(objective), -c.quality(budget), c.trial or 0)), True, 0.0
    best = max(points, key=lambda c: (c.quality(budget), -c.cost(objective), -(c.trial or 0)))
    return best, False, budget.threshold - best.quality(budget)


def study_name(model_name: str, budget: Budget, objective: str, strategy: str, seed: int) -> str:
    return f"{model_name}|{budget.text}|{objective}|{strategy}|seed{seed}"


def search(pipe: Any, calibrate: Calibrate, num_steps: int, budget: str = "psnr>=30", objective: str = "macs",
           strategy: str = "nsga2", seed: int = 0, out: str | Path | None = None, storage: str | None = None,
           time_limit: float | None = None, trials: int | None = None, population: int = 16,
           heldout: Calibrate | None = None, pairs: int = 3, model_name: str | None = None,
           calibration_id: str | None = None, granularity: str = "block", greedy_points: int = 20,
           k_values: list[int] | None = None, margin: float | None = None, quant: QuantSpec | None = None,
           bits: tuple[int, ...] | None = None, correct: bool = False,
           log: Callable[[str], None] = print) -> SearchResult:
    """Search static plans for ``pipe``'s denoiser on the calibration set ``calibrate`` (a callable
    running the pipeline for ``num_steps`` steps on fixed inputs and returning images in [0, 1]).

    ``strategy``: ``nsga2`` (stops after ``trials`` completed trials in the study or ``time_limit``
    seconds), ``dp`` or ``greedy`` (a fixed list of candidates, also cut by ``time_limit``).
    ``out``: folder of the outputs and of the default storage ``sqlite:///out/study.db``;
    ``storage``: any optuna storage URL instead (several workers may share it). ``heldout``: a
    second set, on evaluation seeds, on which the chosen and the best hand-made plans are re-measured
    against the unaccelerated pipeline (``pairs`` interleaved runs each). ``margin``: how far above the
    budget the calibration quality of the chosen plan must lie (default ``DEFAULT_MARGIN``, in the
    budget's unit; 0 chooses the cheapest plan that just meets it).

    Joint cache + quantization search: ``quant`` quantizes every candidate (and the hand-made plans it
    is compared with); ``bits`` (e.g. ``(8, 4)``) lets NSGA-II choose each unit's weight bits; the
    DP then places key steps knowing the quantization error of each step; objective ``bops`` ranks
    plans by bit-weighted MACs.

    ``correct``: fit a per-channel correction of the reused features to the chosen plan, offline on
    calibration images (``methods.feature_correction``; class-conditional embedded pipelines), before
    the held-out check.
    """
    started = time.time()
    the_budget = parse_budget(budget)
    if objective not in OBJECTIVES:
        raise SearchError(f"unknown objective {objective!r}; choose {' or '.join(OBJECTIVES)}")
    if strategy not in STRATEGIES:
        raise SearchError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if trials is not None and trials < 1:
        raise SearchError(f"trials must be >= 1, got {trials}")
    margin = DEFAULT_MARGIN[the_budget.metric] if margin is None else float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise SearchError(f"the margin must be a finite number >= 0, got {margin}")
    if objective == "bops" and quant is None:
        raise SearchError("the bops objective weighs MACs by weight bits: give a quantization spec (--quant)")
    model = denoiser(pipe)
    try:
        space = Space(model, num_steps, granularity, quant, bits)
    except ValueError as exc:
        raise SearchError(str(exc)) from None
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    own_file = storage is None and out is not None  # the default storage: one search of one model
    if own_file:
        storage = f"sqlite:///{(out / 'study.db').resolve()}"
    name = model_name or space.adapter.name
    calib_id = calibration_id or getattr(calibrate, "description", None) or getattr(calibrate, "__name__", "custom")
    if quant is not None:  # a joint search is another search: its storage must not mix with a plain one
        calib_id += f" | quant {quant.model_dump_json(exclude={'calibration'})} bits {list(space.bits)}"
    sampler = None
    if strategy == "nsga2":
        from diffaccel.search.nsga import ClockSeededNSGAII

        sampler = ClockSeededNSGAII(seed=seed, population_size=population)
    store = Store(storage, study_name(name, the_budget, objective, strategy, seed), space,
                  fingerprint(space, calib_id), sampler, check_all_studies=own_file)
    try:
        return _search(pipe, calibrate, space, store, the_budget, objective, strategy, seed, out, time_limit,
                       trials, heldout, pairs, greedy_points, k_values, margin, correct, log, started, name)
    finally:
        store.close()


def _search(pipe, calibrate, space: Space, store: Store, budget: Budget, objective: str, strategy: str, seed: int,
            out: Path | None, time_limit, trials, heldout, pairs, greedy_points, k_values, margin, correct, log,
            started, name):
    from diffaccel.search.nsga import run_list, run_nsga

    log(f"search: {name}, {space.num_steps} steps, {len(space.units)} units, strategy {strategy}, "
        f"budget {budget.text}, objective {objective}; levels {space.describe()}")
    calib = CalibrationRun(pipe, calibrate, space.num_steps, space.units, space.granularity)
    log(f"calibration: {len(calib.reference)} images, full-compute run {calib.seconds:.1f} s")
    deadline = started + time_limit if time_limit else None

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
        attrs = {"psnr": s.psnr, "psnr_min": s.psnr_min, "ssim": s.ssim, "mac_fraction": s.mac_fraction,
                 "latency_fraction": s.latency_fraction, "seconds": round(s.seconds, 3)}
        if space.quant is not None:
            attrs["bops_fraction"] = space.bit_mac_fraction(genome, calib.unit_macs)
        quality = s.psnr if budget.metric == "psnr" else s.ssim
        cost = {"macs": s.mac_fraction, "latency": s.latency_fraction}.get(objective, attrs.get("bops_fraction"))
        return [quality, cost], attrs

    handmade = handmade_plans(space.model, space.num_steps)
    if space.quant is not None:  # compared at the same quantization
        handmade = [replace(h, plan=h.plan.with_quant(space.quant)) for h in handmade]
    seeds: list[tuple[Genome, str]] = []
    for item in handmade:
        genome = space.genome(item.plan.schedule)
        if genome is not None and genome not in [g for g, _ in seeds]:
            seeds.append((genome, "seed " + item.key))
    unit_costs = calib.unit_macs if objective == "macs" else calib.unit_seconds
    if strategy == "nsga2":
        evaluated = run_nsga(store, seeds, evaluate, trials, deadline, log)
    elif strategy == "dp":
        from diffaccel.search.dp import dp_candidates

        quant_error = None
        if space.quant is not None:
            quant_error = calib.unit_error(space.plan(space.all_compute()))
            log(f"quantization error per step (mean over units): {np.round(quant_error.mean(0), 4).tolist()}")
        evaluated = run_list(store, dp_candidates(space, calib.dissimilarity, k_values, quant_error), evaluate,
                             deadline, log)
    else:
        from diffaccel.search.greedy import greedy_candidates

        candidates = greedy_candidates(space, calib.dissimilarity, unit_costs, greedy_points)
        evaluated = run_list(store, candidates, evaluate, deadline, log)

    points = [c for c in _candidates(store, space) if c.mac_fraction < 1.0 - 1e-9 and "error" not in c.extra]
    if not points:
        raise SearchError("the search evaluated no plan that saves work (time limit too short?); run it again "
                          "with more time: it continues where it stopped")
    front = pareto(points, budget, objective)
    safe = budget.raised(margin)
    chosen, met, shortfall = choose(points, safe, objective)
    if not met:  # nothing clears the margin: the cheapest plan meeting the budget itself, if any
        chosen, met, shortfall = choose(points, budget, objective)
    hand = _handmade_scores(store, calib, handmade, space)
    best_hand = choose(hand, budget, objective) if hand else None

    plan = space.plan(chosen.genome, method=f"search-{strategy}", params={
        "budget": budget.text, "objective": objective, "strategy": strategy, "seed": seed,
        "calib_psnr": round(chosen.psnr, 3), "calib_ssim": round(chosen.ssim, 4),
        "mac_fraction": round(chosen.mac_fraction, 4), "trial": chosen.trial, "source": chosen.source})
    if correct:
        from diffaccel.methods.feature_correction import fit_feature_correction

        # fitted on other calibration seeds than the scored ones, so that the calibration PSNR of
        # the corrected plan below is not flattered by its own fit
        log("fitting a per-channel correction of the reused features on other calibration images")
        plan = fit_feature_correction(calib.pipe, plan, seed=seed + CORRECTION_SEED_OFFSET)
        corrected_psnr = calib.score(plan).psnr
        log(f"calibration PSNR with the correction: {corrected_psnr:.2f} dB (without: {chosen.psnr:.2f} dB)")
    if not met:
        log(f"no plan that saves work meets {budget.text} on the calibration set; the closest reaches "
            f"{chosen.quality(budget):.4g}{budget.unit()} (short by {shortfall:.4g}{budget.unit()}) at "
            f"{1 / chosen.mac_fraction:.2f}x fewer MACs")
    summary = {
        "model": name, "strategy": strategy, "objective": objective, "budget": budget.text, "seed": seed,
        "margin": margin, "clears_margin": safe.met(chosen.quality(budget)),
        "num_steps": space.num_steps, "units": space.units, "met": met, "shortfall": shortfall,
        "calib_images": len(calib.reference), "calib_psnr": chosen.psnr, "calib_psnr_min": chosen.psnr_min,
        "calib_ssim": chosen.ssim, "mac_fraction": chosen.mac_fraction, "latency_fraction": chosen.latency_fraction,
        "calib_speedup_macs": 1 / chosen.mac_fraction, "source": chosen.source, "trial": chosen.trial,
        "bops_fraction": chosen.bops_fraction, "feature_correction": correct,
        "calib_psnr_corrected": corrected_psnr if correct else None,
        "quant": None if space.quant is None else {
            "weight_bits": space.quant.weight_bits, "act_bits": space.quant.act_bits, "backend": space.quant.backend,
            "bit_choices": list(space.bits), "unit_bits": dict(zip(space.units, space.unit_bits(chosen.genome)))},
        "trials_complete": store.n_complete(), "evaluated_this_run": evaluated, "front_size": len(front),
        "search_seconds": round(time.time() - started, 1),
        "latency_model": "per-unit wall time of the full-compute calibration run (forward hooks), summed over the "
                         "units a plan computes; reuse is taken as free",
        "unit_macs": calib.unit_macs, "unit_seconds": calib.unit_seconds,
    }
    if best_hand is not None:
        hc, hmet, hshort = best_hand
        summary["best_handmade"] = {"name": hc.extra["name"], "settings": hc.extra["settings"], "met": hmet,
                                    "shortfall": hshort, "calib_psnr": hc.psnr, "calib_ssim": hc.ssim,
                                    "mac_fraction": hc.mac_fraction, "latency_fraction": hc.latency_fraction,
                                    "calib_speedup_macs": 1 / hc.mac_fraction}
    if heldout is not None:
        log("held-out check: the chosen plan against the unaccelerated pipeline")
        measured = compare(calib.pipe, heldout, plan, pairs)
        summary.update(heldout_psnr=measured["psnr"], heldout_psnr_min=measured["psnr_min"],
                       heldout_ssim=measured["ssim"], speedup_macs=measured["speedup_macs"],
                       speedup_wall=measured["speedup_wall"], heldout_images=measured["images"],
                       heldout_pairs=measured["pairs"])
        if best_hand is not None:
            hand_plan = next(h.plan for h in handmade if h.key == best_hand[0].source)
            measured = compare(calib.pipe, heldout, hand_plan, pairs)
            summary["best_handmade"].update(heldout_psnr=measured["psnr"], heldout_ssim=measured["ssim"],
                                            speedup_macs=measured["speedup_macs"],
                                            speedup_wall=measured["speedup_wall"])
    else:
        summary.update(heldout_psnr=None, speedup_macs=1 / chosen.mac_fraction, speedup_wall=None)
    result = SearchResult(plan, met, shortfall, chosen, front, hand, summary, out)
    if out is not None:
        write_outputs(result, budget, objective)
        log(f"wrote {out / 'plan.json'}, front.json, front.png and summary.json")
    return result


def _candidates(store: Store, space: Space) -> list[Candidate]:
    out = []
    for trial in store.complete():
        genome = space.from_params(trial.params)
        if genome is None:
            continue
        a = trial.user_attrs
        extra = {"error": a["error"]} if "error" in a else {}
        out.append(Candidate(genome, space.rows(genome), a.get("psnr", 0.0), a.get("psnr_min", 0.0),
                             a.get("ssim", 0.0), a.get("mac_fraction", 1.0), a.get("latency_fraction", 1.0),
                             a.get("source", ""), trial.number, extra, a.get("bops_fraction")))
    return out


def _handmade_scores(store: Store, calib: CalibrationRun, handmade, space: Space) -> list[Candidate]:
    """Calibration scores of the hand-made plans, cached in the study (they survive a restart)."""
    cached = dict(store.study.user_attrs.get("handmade", {}))
    out = []
    for item in handmade:
        if item.key not in cached:
            try:
                s = calib.score(item.plan)
            except SearchError:
                raise
            except Exception:  # noqa: BLE001 -- a hand-made setting that breaks is left out
                continue
            cached[item.key] = {"psnr": s.psnr, "psnr_min": s.psnr_min, "ssim": s.ssim,
                                "mac_fraction": s.mac_fraction, "latency_fraction": s.latency_fraction}
            store.study.set_user_attr("handmade", cached)
        s = cached[item.key]
        if s["mac_fraction"] >= 1.0 - 1e-9:
            continue
        genome = space.genome(item.plan.schedule)  # forecasts read as reuse: the same cost
        bops = None if space.quant is None or genome is None else space.bit_mac_fraction(genome, calib.unit_macs)
        out.append(Candidate(None, list(item.plan.schedule), s["psnr"], s["psnr_min"], s["ssim"], s["mac_fraction"],
                             s["latency_fraction"], item.key, None, {"name": item.name, "settings": item.settings},
                             bops))
    return out


def write_outputs(result: SearchResult, budget: Budget, objective: str) -> None:
    from diffaccel.generate import write_json

    out = result.out
    result.plan.save(out / "plan.json")
    write_json(out / "front.json", {
        "budget": budget.text, "objective": objective, "strategy": result.summary["strategy"],
        "model": result.summary["model"], "units": result.summary["units"],
        "chosen": result.chosen.as_dict(),
        "front": [c.as_dict() for c in result.front],
        "handmade": [c.as_dict() for c in result.handmade],
    })
    write_json(out / "summary.json", result.summary)
    plot_front(result, budget, objective, out / "front.png")


def plot_front(result: SearchResult, budget: Budget, objective: str, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the plot is a convenience; the JSON files hold the same data
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [1 / c.cost(objective) for c in result.front]
    ys = [c.quality(budget) for c in result.front]
    ax.plot(xs, ys, "o-", color="tab:blue", label=f"{result.summary['strategy']} front")
    for name, marker in (("fora", "s"), ("taylorseer", "^"), ("deepcache", "D"), ("faster_diffusion", "v")):
        hand = [c for c in result.handmade if c.extra.get("name") == name]
        if hand:
            ax.scatter([1 / c.cost(objective) for c in hand], [c.quality(budget) for c in hand], marker=marker,
                       color="tab:orange", alpha=0.8, label=f"{name} (hand-made)")
    ax.scatter([1 / result.chosen.cost(objective)], [result.chosen.quality(budget)], s=160, facecolors="none",
               edgecolors="tab:red", linewidths=2, label="chosen")
    ax.axhline(budget.threshold, color="gray", linestyle="--", linewidth=1, label=f"budget {budget.text}")
    ax.set_xlabel("speedup (" + ("MACs" if objective == "macs" else "estimated latency") + ")")
    ax.set_ylabel(f"calibration {budget.metric.upper()}{budget.unit()}")
    ax.set_title(f"{result.summary['model']}: {result.summary['num_steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

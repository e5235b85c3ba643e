"""``diffaccel search``: a plan that meets a quality budget at the least cost."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from diffaccel.calibration.workload import Workload
from diffaccel.cli.common import (
    ANY_MODEL,
    ANY_STEPS,
    GUIDANCE,
    PIPELINE,
    PROMPTS,
    SAMPLER,
    THREADS,
    WEIGHTS,
    SamplerName,
    app,
    call_steps,
    command_started,
    fail,
    quant_backend_for,
    refuse_sampler_with_folder,
    run_guarded,
    setup,
    target,
)
from diffaccel.cli.lm import LM_MODEL, search_command
from diffaccel.methods.ptq import quant_spec
from diffaccel.search import SearchConfig, parse_budget, parse_duration
from diffaccel.search import search as run_search
from diffaccel.search.sizing import PROBE_STEPS, affordable_sizes, kept_sizes, sizes_kept
from diffaccel.targets import Target


class StrategyName(str, Enum):
    nsga2 = "nsga2"
    dp = "dp"
    greedy = "greedy"
    joint = "joint"


class PrecisionChoice(str, Enum):
    auto = "auto"
    none = "none"
    bfloat16 = "bfloat16"
    float16 = "float16"


class ObjectiveName(str, Enum):
    macs = "macs"
    latency = "latency"
    bops = "bops"


def parse_bit_choices(bits: str | None, quant: str | None) -> tuple[int, ...] | None:
    if bits is None:
        return None
    if quant is None:
        raise ValueError("--bits needs --quant (the spec the per-unit bit widths vary)")
    try:
        choices = tuple(int(b) for b in bits.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"--bits must list integers such as 8,4; got {bits!r}") from None
    if not choices:
        raise ValueError("--bits is empty; give the weight bits to choose from, e.g. 8,4")
    return choices


def check_nsga_options(strategy: Enum | None, trials: int | None, bits: str | None,
                       quant: str | None) -> tuple[int, ...] | None:
    """``--bits`` parsed; ``--trials`` and ``--bits`` are NSGA-II's: refused with another strategy, which
    would ignore them."""
    ignored = [name for name, given in (("--trials", trials), ("--bits", bits)) if given is not None]
    if strategy is not None and strategy.value != "nsga2" and ignored:
        raise ValueError(f"{' and '.join(ignored)} only apply to --strategy nsga2, not {strategy.value}: leave them "
                         "out, or give --strategy nsga2 (the default with them)")
    return parse_bit_choices(bits, quant)


def default_strategy(trials: int | None, bits: str | None, quant: str | None, quant_backend: str) -> str:
    """joint, unless an option only NSGA-II uses is given (``--trials``, ``--bits``) or a simulated
    quantization, which a joint search by MACs could not rank."""
    return "nsga2" if trials is not None or bits is not None or (quant is not None and quant_backend == "fake") \
        else "joint"


def _log(line: str) -> None:
    typer.echo(line, err=True)


BUDGET = typer.Option(None, help="quality budget on the calibration set: psnr>=X (dB) or ssim>=X, also psnr_p5>=X "
                                 "and, on a model that ships an evaluator, judge>=-1 (its verdicts may fall by at most "
                                 "1 point, on 600 more images), comma-separated (default psnr>=30); dlm: accuracy>=-1 "
                                 "(points from the uncached sampler) or accuracy>=95 (percent)")
STRATEGY = typer.Option(None, help="joint (sampler, steps, timesteps, caching and quantization together: the "
                                   "default), nsga2 (evolutionary over caching; the default with --trials or --bits "
                                   "or a simulated --quant), dp (dynamic programming on the profile) or greedy")
CALIB_PER_CLASS = typer.Option(None, min=1, help="calibration images per class (embedded) or per prompt (default: "
                                                 "as many, 2 to 8, as keep its reference run within 3% of --time)")
HELDOUT_PER_CLASS = typer.Option(None, min=1, help="held-out images per class or prompt, evaluation seeds (default: "
                                                   "as many, 1 to 4, as keep the held-out check within 25% of --time)")

OBJECTIVE = typer.Option(ObjectiveName.macs, help="cost to minimise: MACs, latency estimated from per-unit wall "
                                                  "time, or bops (MACs weighted by weight bits)")

MARGIN = typer.Option(None, help="how far calibration quality must clear the budget (default: PSNR, the calibration "
                                 "mean's 95% error bound, 0.5-3 dB; SSIM, 0.005)")
CORRECT = typer.Option(False, help="fit a per-channel correction of the reused features to the chosen plan")
PRECISION = typer.Option("auto", help="last, time the chosen plan under autocast: auto (bfloat16 on a CPU, "
                         "bfloat16 and float16 on a GPU), none, bfloat16 or float16; kept only if faster within "
                         "the budget")
VALIDATE = typer.Option(True, help="before returning a plan, confirm it on fresh calibration seeds (the cheapest "
                                   "plans that cleared the budget, until one meets it there)")


@app.command()
def search(
    ctx: typer.Context,
    model: str = ANY_MODEL,
    pipeline: Path = PIPELINE,
    prompts: Path = PROMPTS,
    budget: str = BUDGET,
    objective: ObjectiveName = OBJECTIVE,
    strategy: StrategyName | None = STRATEGY,
    time_limit: str = typer.Option("15m", "--time", help="wall-clock limit of this run, e.g. 90s, 15m, 2h (0: none)"),
    trials: int = typer.Option(None, min=1, help="nsga2: stop when the study holds this many trials"),
    out: Path = typer.Option(Path("out/search"), help="output folder (and its study.db, to resume from)"),
    storage: str = typer.Option(None, help="optuna storage URL shared by workers (default sqlite:///OUT/study.db)"),
    seed: int = typer.Option(0, min=0, help="search seed (also picks the calibration noise)"),
    calib_per_class: int | None = CALIB_PER_CLASS,
    heldout_per_class: int | None = HELDOUT_PER_CLASS,
    steps: int = ANY_STEPS,
    sampler: SamplerName = SAMPLER,
    guidance: float = GUIDANCE,
    population: int = typer.Option(16, min=2, help="nsga2 population size"),
    pairs: int = typer.Option(3, min=1, help="interleaved baseline/plan runs for the held-out wall-clock speedup"),
    margin: float = MARGIN,
    quant: str = typer.Option(None, help="quantize, e.g. w8a8 (joint by MACs: the chosen plan, if measured faster)"),
    quant_backend: str = typer.Option(None, help="with --quant: fake (default), int8 or int8-dynamic"),
    bits: str = typer.Option(None, help="with --quant: weight bits each unit may take, e.g. 8,4 (nsga2)"),
    correct: bool = CORRECT,
    validate: bool = VALIDATE,
    judge_images: int = typer.Option(600, min=1, help="under judge>=X: about how many images the judge compares"),
    precision: PrecisionChoice = PRECISION,
    weights: Path = WEIGHTS,
    threads: int = THREADS,
) -> None:
    """Search a static plan that meets a quality budget at the least cost; write plan.json, front.json,
    front.png and summary.json. Run the same command again to resume an interrupted search."""
    if model == LM_MODEL and pipeline is None:
        return run_guarded(search_command, ctx, out_dir=out)

    def job():
        started = command_started()  # the limit is the whole command's, its imports included
        setup(threads, guidance)
        quality = _checked_budget(ctx, pipeline, budget)
        backend = quant_backend_for(quant, quant_backend)
        limit, choices = parse_duration(time_limit), check_nsga_options(strategy, trials, bits, quant)
        tgt = target(model, pipeline, prompts, sampler, weights)
        calibrate, heldout, sizes = _workloads(tgt, call_steps(tgt, steps), guidance, seed, limit, pairs,
                                               kept_sizes(out, (calib_per_class, heldout_per_class), _log))
        with sizes_kept(out, *sizes):
            spec = quant_spec(tgt.pipe, calibrate, quant, backend) if quant is not None else None
            config = SearchConfig(budget=quality, objective=objective.value, seed=seed, strategy=strategy.value
                                  if strategy else default_strategy(trials, bits, quant, backend),
                                  time_limit=limit, trials=trials, population=population, pairs=pairs,
                                  margin=margin, quant=spec, bits=choices, correct=correct, validate=validate,
                                  precision=precision.value, judge_images=judge_images,
                                  model_name=f"{tgt.name}-{sampler.value}" if tgt.embedded else tgt.name)
            return run_search(tgt.pipe, calibrate, config, out=out, storage=storage, heldout=heldout, log=_log,
                              started=started, judge=tgt.judge())

    result = run_guarded(job, out_dir=out)
    if not result.met:
        _fail_unmet(result.summary, out)
    typer.echo(summary_line(result.summary))


def _fail_unmet(s: dict, out: Path) -> None:
    fail(f"no plan meets {s['budget']} on the calibration set; the closest ({s['source']}) reaches "
         f"{s['calib_psnr']:.2f} dB PSNR / {s['calib_ssim']:.4f} SSIM, short by {s['shortfall_text']}, at "
         f"{s['calib_speedup_macs']:.2f}x fewer MACs; wrote it to {out / 'plan.json'}")


def _workloads(tgt: Target, num_steps: int, guidance: float, seed: int, limit: float | None, pairs: int,
               sizes: tuple[int | None, int | None]) -> tuple[Workload, Workload, tuple[int, int]]:
    """The calibration and held-out calls, as many per class or prompt as given or as the time limit affords
    (timed on a short run: a prompt file's own steps are shortened too), and those two sizes."""
    probe = tgt.workload(PROBE_STEPS, guidance, 1, seed).with_steps(PROBE_STEPS)
    calib, held = affordable_sizes(lambda: probe(tgt.pipe), num_steps, limit, pairs, *sizes, _log)
    return (tgt.workload(num_steps, guidance, calib, seed),
            tgt.workload(num_steps, guidance, held, 0, calibration=False), (calib, held))


def _tail_text(s: dict) -> str:
    """Under a budget that bounds the tail: the held-out 5th percentile and the validation's lower bound on it."""
    if not s.get("budget") or parse_budget(s["budget"]).tail is None or s.get("heldout_psnr_p5") is None:
        return ""
    bound = s.get("validation_psnr_p5_bound")
    return (f" (5th pct {s['heldout_psnr_p5']:.1f} dB held-out"
            + (f", at least {bound:.1f} on validation" if bound is not None else "") + ")")


def _judged_text(s: dict) -> str:
    """Under a judge budget: the chosen plan's judged change, on the judge's images."""
    judged = s.get("judged")
    return "" if not judged else f", judged {judged['change'] * 100:+.1f} pt on {judged['images']} images"


def _checked_budget(ctx: typer.Context, pipeline: Path | None, budget: str | None) -> str:
    """The budget's text (default ``psnr>=30``), read, and the other options that need no model checked."""
    refuse_sampler_with_folder(ctx, pipeline)
    return parse_budget("psnr>=30" if budget is None else budget).text


def summary_line(s: dict) -> str:
    """One line: the chosen plan's speed and quality, and the best hand-made plan's."""
    bops = s.get("bops_fraction") if s.get("quant") else None  # bit-ops differ from MACs only when quantized
    line = (f"{s['model']} {s['strategy']}: {s['speedup_macs']:.2f}x MACs, "
            + (f"{1 / bops:.2f}x bit-ops, " if bops else "") + f"{s['speedup_wall']:.2f}x wall, "
            f"PSNR {s['calib_psnr']:.2f} dB calibration"
            + (f" / {s['validation_psnr']:.2f} dB validation" if s.get("validation_psnr") is not None else "")
            + f" / {s['heldout_psnr']:.2f} dB held-out" + _tail_text(s) + _judged_text(s))
    hand = s.get("best_handmade")
    if hand and "heldout_psnr" not in hand:  # not re-measured on held-out: no time was left
        line += (f" | best hand-made {hand['name']} {hand['settings']}: {hand['calib_speedup_macs']:.2f}x denoiser "
                 f"MACs, PSNR {hand['calib_psnr']:.2f} dB calibration (not re-measured: time limit; the chosen plan "
                 f"there: {s['calib_speedup_macs']:.2f}x, {s['calib_psnr']:.2f} dB)")
    elif hand and hand.get("chosen"):
        line += f" | the best hand-made plan, {hand['name']} {hand['settings']}, is the plan chosen"
    elif hand:
        line += (f" | best hand-made {hand['name']} {hand['settings']}: {hand['speedup_macs']:.2f}x MACs, "
                 f"{hand['speedup_wall']:.2f}x wall, PSNR {hand['calib_psnr']:.2f} / {hand['heldout_psnr']:.2f} dB"
                 + ("" if hand["met"] else " (misses the budget)"))
    return line

"""Command line: ``diffaccel generate | train``."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from diffaccel.errors import DiffaccelError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Make diffusion sampling cheaper, and show what it cost in quality.")


class ModelName(str, Enum):
    dit = "dit"
    unet = "unet"


class SamplerName(str, Enum):
    ddim = "ddim"
    dpm = "dpm"


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def parse_params(interval, branch, order, threshold, params: list[str]) -> dict:
    """Method settings from the named options and ``--param key=value`` pairs (JSON values)."""
    import json

    settings = {k: v for k, v in dict(interval=interval, branch=branch, order=order, threshold=threshold).items()
                if v is not None}
    for item in params or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param needs key=value, got {item!r}")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value
    return settings


def resolve_plan(pipe, steps: int, method: str | None, plan_file: Path | None, settings: dict,
                 guidance: float | None = None):
    from diffaccel.methods.registry import build
    from diffaccel.plan import Plan, PlanError

    if method and plan_file:
        raise ValueError("give either --method or --plan, not both")
    if plan_file is not None:
        if settings:
            raise ValueError("method settings (--interval, --param, ...) go with --method, not --plan")
        return Plan.load(plan_file)
    if method:
        return build(method, pipe, steps, guidance=guidance, **settings)
    if settings:
        raise PlanError("method settings were given without --method")
    return None


@app.command()
def generate(
    model: ModelName = typer.Option(ModelName.dit, help="embedded model"),
    classes: str = typer.Option(None, help="comma-separated class names (default: all)"),
    per_class: int = typer.Option(8, min=1, help="images per class"),
    steps: int = typer.Option(50, min=1, help="denoising steps"),
    sampler: SamplerName = typer.Option(SamplerName.ddim, help="ddim or dpm (DPM-Solver++)"),
    guidance: float = typer.Option(3.0, help="classifier-free guidance scale (<= 1 disables it)"),
    seed: int = typer.Option(0, min=0, help="base seed; each image's noise follows from it"),
    out: Path = typer.Option(Path("out/generate"), help="output folder"),
    method: str = typer.Option(None, help="acceleration method (see `diffaccel methods`)"),
    plan: Path = typer.Option(None, "--plan", help="a plan JSON file to apply"),
    compare: bool = typer.Option(False, help="also run the unaccelerated model on the same seeds, interleaved"),
    interval: int = typer.Option(None, help="method setting: full-compute interval"),
    branch: int = typer.Option(None, help="method setting: U-Net skip branch (deepcache)"),
    order: int = typer.Option(None, help="method setting: Taylor order (taylorseer)"),
    threshold: float = typer.Option(None, help="method setting: residual threshold (dynamic, erta)"),
    param: list[str] = typer.Option(None, help="other method settings, key=value (repeatable)"),
    save_plan: Path = typer.Option(None, help="also write the plan used to this file"),
    batch_size: int = typer.Option(64, min=1, help="images per pipeline call"),
    weights: Path = typer.Option(None, help="weights folder (default: the shipped weights)"),
    threads: int = typer.Option(0, min=0, help="torch threads (0: torch's default)"),
    quant: str = typer.Option(None, help="also quantize the model: w8a8, w4a8, ... (calibrated on first use)"),
    quant_backend: str = typer.Option("fake", help="fake (simulated, any width), int8 (calibrated scales, int8 "
                                                   "matmuls) or int8-dynamic (fbgemm, fastest on a CPU); int8: W8A8"),
    quant_per_step: bool = typer.Option(False, help="one activation scale per denoising step"),
) -> None:
    """Sample every class from an embedded model, optionally with a plan, and score the images."""
    import torch

    from diffaccel.generate import GenerateConfig, run_generate
    from diffaccel.plan import Plan
    from diffaccel.zoo import shapes
    from diffaccel.zoo.weights import load_evaluator, load_pipeline

    if threads:
        torch.set_num_threads(threads)
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes is not None else None
    try:
        if names is not None and not names:
            raise ValueError(f"--classes is empty; choose from {', '.join(shapes.CLASSES)}")
        shapes.class_ids(names)
        if not torch.isfinite(torch.tensor(guidance)):
            raise ValueError(f"--guidance must be a finite number, got {guidance}")
        settings = parse_params(interval, branch, order, threshold, param)
        cfg = GenerateConfig(model=model.value, classes=names, per_class=per_class, steps=steps,
                             sampler=sampler.value, guidance=guidance, seed=seed, batch_size=batch_size)
        if plan is not None:
            Plan.load(plan)  # a broken plan file fails before any model is loaded
        pipe = load_pipeline(cfg.model, cfg.sampler, weights)
        the_plan = resolve_plan(pipe, steps, method, plan, settings, guidance)
        if quant is not None:
            from diffaccel.methods.ptq import ptq, quant_spec

            if the_plan is None:
                the_plan = ptq(pipe, steps, bits=quant, backend=quant_backend, per_step=quant_per_step,
                               guidance=guidance)
            else:
                the_plan = the_plan.with_quant(quant_spec(pipe, steps, quant, quant_backend, quant_per_step,
                                                          guidance=guidance))
        if the_plan is not None and save_plan is not None:
            the_plan.save(save_plan)
        record = run_generate(cfg, out, pipe, load_evaluator(), plan=the_plan, compare=compare)
    except (DiffaccelError, ValueError) as exc:
        fail(str(exc))
    typer.echo(summary_line(record))
    typer.echo(f"wrote {out / 'grid.png'} and {out / 'record.json'}")


def summary_line(record: dict) -> str:
    head = (f"{record['model']}: {record['n_images']} images, {record['steps']} {record['sampler']} steps, "
            f"guidance {record['guidance']:g}")
    if "plan" in record:
        head += f" | plan {record['plan']['method']}"
    parts = [head]
    if "speedup_wall" in record:
        parts.append(f"speedup {record['speedup_wall']:.2f}x wall, {record['speedup_macs']:.2f}x MACs")
        parts.append(f"PSNR {record['psnr']:.1f} dB, SSIM {record['ssim']:.3f} vs unaccelerated")
    elif "speedup_macs" in record:
        parts.append(f"speedup {record['speedup_macs']:.2f}x MACs")
    accuracy = f"accuracy {record['accuracy']:.1%}"
    if "baseline" in record:
        accuracy += f" (unaccelerated {record['baseline']['accuracy']:.1%})"
    parts.append(accuracy)
    parts.append(f"FD {record['fd']:.2f} (floor {record['fd_floor']:.2f}, {record['fd_samples']} samples)")
    parts.append(f"{record['macs_per_image'] / 1e9:.2f} GMACs/image, {record['seconds']:.1f} s")
    return " | ".join(parts)


plan_app = typer.Typer(help="Make and inspect plans.", no_args_is_help=True)
app.add_typer(plan_app, name="plan")


@plan_app.command("show")
def plan_show(path: Path = typer.Argument(..., help="plan JSON file"),
              model: ModelName = typer.Option(None, help="embedded model to measure MACs on "
                                                         "(default: the one the plan fits, if any)")) -> None:
    """Print a plan's step x unit map and the MACs it costs relative to the full model."""
    from diffaccel.plan import Plan
    from diffaccel.report.plan_view import render_plan

    try:
        the_plan = Plan.load(path)
        typer.echo(render_plan(the_plan, model.value if model else None))
    except (DiffaccelError, ValueError) as exc:
        fail(str(exc))


@plan_app.command("make")
def plan_make(
    method: str = typer.Argument(..., help="method name"),
    model: ModelName = typer.Option(ModelName.dit, help="embedded model"),
    steps: int = typer.Option(50, min=1),
    sampler: SamplerName = typer.Option(SamplerName.ddim),
    interval: int = typer.Option(None), branch: int = typer.Option(None), order: int = typer.Option(None),
    threshold: float = typer.Option(None),
    param: list[str] = typer.Option(None, help="other settings, key=value (repeatable)"),
    out: Path = typer.Option(Path("plan.json"), help="where to write the plan"),
) -> None:
    """Make a plan with a method for an embedded model and save it."""
    from diffaccel.methods.registry import build
    from diffaccel.zoo.weights import load_pipeline

    try:
        pipe = load_pipeline(model.value, sampler.value)
        the_plan = build(method, pipe, steps, **parse_params(interval, branch, order, threshold, param))
        the_plan.save(out)
    except (DiffaccelError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {out}")


@app.command()
def quantize(
    model: ModelName = typer.Option(ModelName.dit, help="embedded model"),
    bits: str = typer.Option("w8a8", help="weight and activation bits: w8a8, w4a8, ..."),
    backend: str = typer.Option("fake", help="fake (simulated, any width), int8 (calibrated scales, int8 matmuls) "
                                             "or int8-dynamic (fbgemm, fastest on a CPU); int8 paths: W8A8 only"),
    per_step: bool = typer.Option(False, help="one activation scale per denoising step"),
    keep: list[str] = typer.Option(None, help="layer-name pattern to keep in floating point (repeatable)"),
    steps: int = typer.Option(50, min=1, help="denoising steps of the plan"),
    guidance: float = typer.Option(3.0, help="guidance scale of the calibration runs"),
    per_class: int = typer.Option(2, min=1, help="calibration runs per class"),
    sensitivity: bool = typer.Option(False, help="also rank the layers by the error each adds alone"),
    out: Path = typer.Option(Path("out/quant"), help="folder for plan.json and its calibration file"),
    threads: int = typer.Option(0, min=0, help="torch threads (0: torch's default)"),
) -> None:
    """Calibrate timestep-aware post-training quantization and write a plan that applies it."""
    import json

    import torch

    from diffaccel.methods.ptq import ptq
    from diffaccel.quant import Calibration
    from diffaccel.quant.sensitivity import record_inputs
    from diffaccel.quant.sensitivity import sensitivity as rank_layers
    from diffaccel.zoo.weights import load_pipeline

    if threads:
        torch.set_num_threads(threads)
    try:
        pipe = load_pipeline(model.value)
        the_plan = ptq(pipe, steps, bits=bits, backend=backend, per_step=per_step, keep=tuple(keep or ()),
                       guidance=guidance, per_class=per_class)
        out.mkdir(parents=True, exist_ok=True)
        the_plan.save(out / "plan.json")
        typer.echo(f"wrote {out / 'plan.json'} and {out / 'plan.calibration.safetensors'} ({the_plan.quant.label}, "
                   f"{the_plan.quant.backend})")
        if sensitivity:
            from diffaccel.methods.base import calibration_batch

            labels, gens = calibration_batch(pipe, None, 1, seed=1)  # calibration seeds, not evaluation ones
            calls = record_inputs(pipe, labels, [g.initial_seed() for g in gens], steps, guidance)
            rows = rank_layers(pipe, the_plan.quant, Calibration.load(the_plan.quant.calibration), calls)
            (out / "sensitivity.json").write_text(json.dumps(rows, indent=2))
            for row in rows[:10]:
                typer.echo(f"  {row['relative_error']:.2e}  {row['layer']}")
            typer.echo(f"wrote {out / 'sensitivity.json'} ({len(rows)} layers, worst first)")
    except (DiffaccelError, ValueError) as exc:
        fail(str(exc))


@app.command("methods")
def list_methods() -> None:
    """List the acceleration methods and their settings."""
    from diffaccel.methods.registry import METHODS, parameters

    for name, (_, adapters, _) in METHODS.items():
        knobs = ", ".join(f"{k}={v!r}" for k, v in parameters(name).items())
        typer.echo(f"{name:18s} [{'/'.join(adapters)}]  {knobs}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Train a model or the evaluator (options: see `diffaccel train --help-train`)."""
    from diffaccel.zoo.train import main

    args = ["--help" if a == "--help-train" else a for a in ctx.args]
    main(args)


class StrategyName(str, Enum):
    nsga2 = "nsga2"
    dp = "dp"
    greedy = "greedy"


class ObjectiveName(str, Enum):
    macs = "macs"
    latency = "latency"
    bops = "bops"


@app.command()
def search(
    model: ModelName = typer.Option(ModelName.dit, help="embedded model"),
    budget: str = typer.Option("psnr>=30", help="quality budget on the calibration set: psnr>=X (dB) or ssim>=X"),
    objective: ObjectiveName = typer.Option(ObjectiveName.macs, help="cost to minimise: MACs, latency estimated "
                                                                     "from per-unit wall time, or bops (MACs "
                                                                     "weighted by weight bits; with --quant)"),
    strategy: StrategyName = typer.Option(StrategyName.nsga2, help="nsga2 (evolutionary), dp (dynamic "
                                                                   "programming on the profile) or greedy"),
    time_limit: str = typer.Option("15m", "--time", help="wall-clock limit of this run, e.g. 90s, 15m, 2h"),
    trials: int = typer.Option(None, min=1, help="nsga2: stop when the study holds this many trials"),
    out: Path = typer.Option(Path("out/search"), help="output folder (and its study.db, to resume from)"),
    storage: str = typer.Option(None, help="optuna storage URL shared by workers (default sqlite:///OUT/study.db)"),
    seed: int = typer.Option(0, min=0, help="search seed (also picks the calibration noise)"),
    calib_per_class: int = typer.Option(2, help="calibration images per class (calibration seed range)"),
    heldout_per_class: int = typer.Option(4, min=1, help="held-out images per class (evaluation seeds)"),
    steps: int = typer.Option(50, min=2, help="denoising steps"),
    sampler: SamplerName = typer.Option(SamplerName.ddim, help="ddim or dpm"),
    guidance: float = typer.Option(3.0, help="classifier-free guidance scale"),
    population: int = typer.Option(16, min=2, help="nsga2 population size"),
    pairs: int = typer.Option(3, min=1, help="interleaved baseline/plan runs for the held-out wall-clock speedup"),
    margin: float = typer.Option(None, help="how far the chosen plan's calibration quality must clear the budget, "
                                            "so that unseen inputs meet it too (default 0.5 dB, or 0.005 SSIM)"),
    quant: str = typer.Option(None, help="joint search: quantize every plan, e.g. w8a8 (calibrated on first use)"),
    quant_backend: str = typer.Option("fake", help="with --quant: fake, int8 or int8-dynamic"),
    bits: str = typer.Option(None, help="with --quant: weight bits each unit may take, e.g. 8,4 (nsga2)"),
    correct: bool = typer.Option(False, help="fit a per-channel correction of the reused features to the chosen "
                                             "plan (offline, on calibration images)"),
    weights: Path = typer.Option(None, help="weights folder (default: the shipped weights)"),
    threads: int = typer.Option(0, min=0, help="torch threads (0: torch's default)"),
) -> None:
    """Search a static plan that meets a quality budget at the least cost; write plan.json, front.json,
    front.png and summary.json. Run the same command again to resume an interrupted search."""
    import torch

    from diffaccel.search import embedded_calibration, parse_budget, parse_duration
    from diffaccel.search import search as run_search
    from diffaccel.zoo.weights import load_pipeline

    if threads:
        torch.set_num_threads(threads)
    try:
        parse_budget(budget)
        limit = parse_duration(time_limit)
        calibrate = embedded_calibration(None, calib_per_class, steps, guidance, seed=seed)
        heldout = embedded_calibration(None, heldout_per_class, steps, guidance, seed=0, calibration=False)
        pipe = load_pipeline(model.value, sampler.value, weights)
        spec, choices = None, None
        if bits is not None and quant is None:
            raise ValueError("--bits needs --quant (the spec the per-unit bit widths vary)")
        if quant is not None:
            from diffaccel.methods.ptq import quant_spec

            spec = quant_spec(pipe, steps, quant, quant_backend, guidance=guidance)
            if bits is not None:
                try:
                    choices = tuple(int(b) for b in bits.split(",") if b.strip())
                except ValueError:
                    raise ValueError(f"--bits must list integers such as 8,4; got {bits!r}") from None
                if not choices:
                    raise ValueError("--bits is empty; give the weight bits to choose from, e.g. 8,4")
        result = run_search(pipe, calibrate, steps, budget=budget, objective=objective.value,
                            strategy=strategy.value, seed=seed, out=out, storage=storage, time_limit=limit,
                            trials=trials, population=population, heldout=heldout, pairs=pairs,
                            model_name=f"{model.value}-{sampler.value}", margin=margin, quant=spec, bits=choices,
                            correct=correct,
                            log=lambda line: typer.echo(line, err=True))
    except (DiffaccelError, ValueError) as exc:
        fail(str(exc))
    s = result.summary
    if not result.met:
        fail(f"no plan meets {s['budget']} on the calibration set; the closest ({s['source']}) reaches "
             f"{s['calib_psnr']:.2f} dB PSNR / {s['calib_ssim']:.4f} SSIM, short by {s['shortfall']:.4g}, at "
             f"{s['calib_speedup_macs']:.2f}x fewer MACs; wrote it to {out / 'plan.json'}")
    line = (f"{s['model']} {s['strategy']}: {s['speedup_macs']:.2f}x MACs, {s['speedup_wall']:.2f}x wall, "
            f"PSNR {s['calib_psnr']:.2f} dB calibration / {s['heldout_psnr']:.2f} dB held-out")
    hand = s.get("best_handmade")
    if hand:
        line += (f" | best hand-made {hand['name']} {hand['settings']}: {hand['speedup_macs']:.2f}x MACs, "
                 f"{hand['speedup_wall']:.2f}x wall, PSNR {hand['calib_psnr']:.2f} / {hand['heldout_psnr']:.2f} dB"
                 + ("" if hand["met"] else " (misses the budget)"))
    typer.echo(line)


@app.command()
def bench(
    model: str = typer.Option(..., help="embedded model: dit or unet"),
    quick: bool = typer.Option(False, help="a short run: 2 images per class, two settings per method "
                                           "(Fréchet distances then come from few samples, and say so)"),
    out: Path = typer.Option(Path("out/bench"), help="output folder (results.json, results.md, report.html)"),
    sweep: Path = typer.Option(None, help="JSON file: names -> lists of settings objects (replaces the default sweep)"),
    only: str = typer.Option(None, help="comma-separated methods/peers of the sweep to run"),
    peers: bool = typer.Option(True, help="run the peers (--no-peers: diffaccel and step baselines only)"),
    per_class: int = typer.Option(None, help="images per class (default 100; 2 with --quick)"),
    batch_size: int = typer.Option(None, help="images per pipeline call (default 60; 4 with --quick)"),
    classes: str = typer.Option(None, help="comma-separated class names (default: all)"),
    steps: int = typer.Option(50, help="denoising steps of the baseline"),
    sampler: SamplerName = typer.Option(SamplerName.ddim, help="ddim or dpm (DPM-Solver++)"),
    guidance: float = typer.Option(3.0, help="classifier-free guidance scale"),
    seed: int = typer.Option(100, min=0, help="base seed of the held-out noise"),
    threads: int = typer.Option(1, help="torch threads in every worker process"),
    timed_pairs: int = typer.Option(None, help="batches each group times against the baseline (default 5; "
                                               "all with --quick)"),
    resume: bool = typer.Option(False, help="continue the newest unfinished run of the same settings in --out"),
    group_timeout: float = typer.Option(6 * 3600.0, help="seconds one group (a peer, one of our methods) may take"),
    weights: Path = typer.Option(None, help="weights folder (default: the shipped weights)"),
) -> None:
    """Benchmark every diffaccel method, the peers and fewer-step baselines on one embedded model:
    speed (MACs, wall clock), memory and quality, written as results.json, results.md and report.html."""
    import math

    from diffaccel.bench import BenchConfig, run_bench
    from diffaccel.bench.sweeps import load_sweep

    try:
        if not math.isfinite(guidance):
            raise ValueError(f"--guidance must be a finite number, got {guidance}")
        names = [c.strip() for c in classes.split(",") if c.strip()] if classes is not None else None
        cfg = BenchConfig(model=model, quick=quick, per_class=per_class, batch_size=batch_size, steps=steps,
                          sampler=sampler.value, guidance=guidance, seed=seed, threads=threads, classes=names,
                          sweep=load_sweep(sweep, model) if sweep is not None and model in ("dit", "unet") else None,
                          only=[n.strip() for n in only.split(",") if n.strip()] if only is not None else None,
                          peers=peers, group_timeout=group_timeout, weights=str(weights) if weights else None,
                          timed_pairs=timed_pairs, resume=resume)
        if only is not None and not cfg.only:
            raise ValueError("--only is empty")
        path = run_bench(cfg, out, log=lambda line: typer.echo(line, err=True))
    except (DiffaccelError, ValueError) as exc:
        fail(str(exc))
    from diffaccel.bench import load_results
    from diffaccel.report.html import summary_lines

    results = load_results(path)
    typer.echo(f"speedup at PSNR >= {results.psnr_floor:g} dB:")
    for name, family, text in summary_lines(results):
        typer.echo(f"  {name:30s} {family:9s} {text}")
    typer.echo(f"wrote {path}, {out / 'results.md'} and {out / 'report.html'}")


@app.command()
def report(
    results: Path = typer.Argument(..., help="a results.json written by `diffaccel bench`"),
    out: Path = typer.Option(None, help="output folder (default: the results file's folder)"),
) -> None:
    """Render results.md and report.html again from a saved results.json, without rerunning."""
    from diffaccel.bench import load_results
    from diffaccel.report.html import write_report

    try:
        data = load_results(results)
        md, page = write_report(data, results.parent, out if out is not None else results.parent)
    except (DiffaccelError, ValueError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {md} and {page}")


def main() -> None:
    """Entry point: click's usage errors and our own come out as one line, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        code = 130
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.TyperException as exc:  # usage errors: bad option values, unknown options
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if message.strip():  # empty for "no command given", after the help was shown
            typer.echo(f"error: {' '.join(message.split())}", err=True)
        code = getattr(exc, "exit_code", 2)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()

"""``diffaccel bench`` and ``diffaccel report``: every method and peer side by side, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import typer

from diffaccel.bench import BenchConfig, load_results, run_bench
from diffaccel.bench.report import render_report, save_report, summary_lines
from diffaccel.bench.results import BenchError, Results, headline, relocated, resummarized
from diffaccel.bench.sweeps import read_sweep
from diffaccel.cli.common import (
    ANY_MODEL,
    ANY_STEPS,
    PIPELINE,
    PROMPTS,
    SamplerName,
    app,
    class_names,
    fail,
    refuse_sampler_with_folder,
    run_guarded,
    steps_of,
)
from diffaccel.cli.lm import BENCH_OPTIONS, LM_MODEL, lm_bench, refuse_image_options
from diffaccel.eval.io import write_json
from diffaccel.targets import T2I_MODELS, in_caption_language, load_target, read_prompts, t2i_default_calls, t2i_folder
from diffaccel.zoo.t2i.pipelines import PIXART_CALL


@app.command()
def bench(
    ctx: typer.Context,
    model: str = ANY_MODEL,
    pipeline: Path = PIPELINE,
    prompts: Path = PROMPTS,
    quick: bool = typer.Option(False, help="a short run: 2 images per class, two settings per method "
                                           "(Fréchet distances then come from few samples, and say so)"),
    out: Path = typer.Option(Path("out/bench"), help="output folder (results.json, results.md, report.html)"),
    sweep: Path = typer.Option(None, help="JSON file: names -> lists of settings objects (replaces the default "
                                          "sweep); \"plan\": [{\"file\": \"plan.json\"}] adds a plan file's row"),
    only: str = typer.Option(None, help="comma-separated methods/peers of the sweep to run"),
    peers: bool = typer.Option(True, help="run the peers (--no-peers: diffaccel and step baselines only)"),
    per_class: int = typer.Option(None, min=1, help="images per class or prompt (default 100; 2 with --quick); dlm: "
                                                    "problems per task (default 100; 5 with --quick)"),
    batch_size: int = typer.Option(None, min=1, help="images per pipeline call (default 60; 4 with --quick)"),
    classes: str = typer.Option(None, help="embedded models: comma-separated class names (default: all)"),
    steps: int = ANY_STEPS,
    sampler: SamplerName = typer.Option(SamplerName.ddim, help="ddim or dpm (DPM-Solver++)"),
    guidance: float = typer.Option(3.0, help="classifier-free guidance scale"),
    seed: int = typer.Option(100, min=0, help="base seed of the held-out noise"),
    threads: int = typer.Option(1, min=1, help="torch threads in every worker process"),
    timed_pairs: int = typer.Option(None, min=1, help="batches each group times against the baseline (default 5; "
                                                      "all with --quick); dlm: timed repeats per row (default 5)"),
    budget: str = typer.Option("accuracy>=-1", help="dlm: the search row's budget (accuracy points from the uncached "
                                                    "sampler, or an absolute floor: accuracy>=95)"),
    resume: bool = typer.Option(False, help="continue the newest unfinished run of the same settings in --out"),
    group_timeout: float = typer.Option(6 * 3600.0, min=1, help="seconds one group (a peer, a method) may take"),
    weights: Path = typer.Option(None, help="weights folder (default: the shipped weights)"),
    tail: float = typer.Option(None, help="the summary also asks the 5th-percentile image's PSNR to reach this "
                                          "many dB (a setting that ruins a few images does not count)"),
) -> None:
    """Benchmark every diffaccel method, the peers and fewer-step baselines on one embedded model or
    pipeline folder: speed (MACs, wall clock), memory and quality, written as results.json, results.md
    and report.html. ``--model dlm``: every LM method and the plan searched under ``--budget``,
    against the uncached sampler on held-out problems (results.json, results.md)."""
    if model == LM_MODEL and pipeline is None:
        run_guarded(lambda: refuse_image_options(ctx, BENCH_OPTIONS))
        _bench_lm(out, budget, per_class or (5 if quick else 100), timed_pairs or (1 if quick else 5), steps, only,
                  weights, threads, resume)
        return

    def job():
        nonlocal pipeline, prompts, weights
        _check_options(ctx, pipeline, tail)
        pipeline, prompts, adherence, weights = _inputs(model, pipeline, prompts, weights, sampler.value, guidance, out)
        names = class_names(classes)
        cfg = BenchConfig(model=model, quick=quick, per_class=per_class, batch_size=batch_size,
                          steps=_bench_steps(prompts, steps),
                          sampler=sampler.value, guidance=guidance, seed=seed, threads=threads, classes=names,
                          sweep=read_sweep(sweep) if sweep is not None else None,
                          only=[n.strip() for n in only.split(",") if n.strip()] if only is not None else None,
                          peers=peers, group_timeout=group_timeout, weights=str(weights) if weights else None,
                          timed_pairs=timed_pairs, resume=resume,
                          pipeline=str(pipeline) if pipeline else None, prompts=str(prompts) if prompts else None,
                          adherence=adherence, tail=tail)
        if only is not None and not cfg.only:
            raise ValueError("--only is empty")
        return run_bench(cfg, out, log=lambda line: typer.echo(line, err=True))

    _print_summary(run_guarded(job, out_dir=out), out)


def _inputs(model: str, pipeline: Path | None, prompts: Path | None, weights: Path | None, sampler: str,
            guidance: float, out: Path) -> tuple[Path | None, Path | None, bool, Path | None]:
    """The pipeline folder, prompts, whether adherence is scored, and the weights a bench runs: a t2i
    zoo model runs as its pipeline folder; a user's folder and prompts are checked here, once, not by
    every worker group."""
    if not math.isfinite(guidance):  # before _t2i_inputs writes into --out
        raise ValueError(f"--guidance must be a finite number, got {guidance}")
    if model in T2I_MODELS and pipeline is None:
        (pipeline, prompts, adherence), weights = _t2i_inputs(model, weights, prompts, out), None
        return pipeline, prompts, adherence, weights
    if pipeline is not None:
        load_target(model, pipeline, prompts, sampler, weights)
    return pipeline, prompts, False, weights


def _check_options(ctx: typer.Context, pipeline: Path | None, tail: float | None) -> None:
    """The options that need no model, checked before one loads."""
    refuse_sampler_with_folder(ctx, pipeline)
    _check_tail(tail)


def _check_tail(tail: float | None) -> None:
    if tail is not None and not math.isfinite(tail):
        raise ValueError(f"--tail must be a finite number of dB, got {tail}")


def _bench_steps(prompts: Path | None, steps: int | None) -> int:
    """The one step count the bench compares every setting at: ``--steps``, else the prompt file's (it had
    run 50 and skipped every plan when each line set 6), else 50."""
    lines = read_prompts(prompts) if prompts else None
    if len({line.get("num_inference_steps") for line in lines or [{}]}) > 1:
        raise ValueError("the prompt file's lines run different num_inference_steps, and the bench compares every "
                         "setting at one step count: give every line the same (or none, and --steps)")
    if len({(line.get("height"), line.get("width")) for line in lines or [{}]}) > 1:  # failed after every group
        raise ValueError("the prompt file's lines make images of different sizes, which the bench scores side by "
                         "side: give every line the same height and width")
    return steps_of(lines, steps)


def _print_summary(path: Path, out: Path) -> None:
    results = load_results(path)
    typer.echo(f"speedup at {headline(results.psnr_floor, results.psnr_p5_floor)}:")
    for name, family, text in summary_lines(results):
        typer.echo(f"  {name:30s} {family:9s} {text}")
    typer.echo(f"wrote {path}, {out / 'results.md'} and {out / 'report.html'}")


def _bench_lm(out: Path, budget: str, per_task: int, repeats: int, steps: int | None, only: str | None,
              weights: Path | None, threads: int, resume: bool) -> None:
    rows = [n.strip() for n in only.split(",") if n.strip()] if only is not None else None
    if rows == []:
        fail("--only is empty: name the rows to run (or leave --only out for all)")
    torch.set_num_threads(threads)  # the LM bench runs in this process
    record = run_guarded(lambda: lm_bench(out, budget, per_task, repeats, steps, rows, weights, resume, threads))
    typer.echo(f"accuracy of the uncached sampler {record['rows'][0]['baseline_accuracy']:.1f} %")
    for row in record["rows"]:
        typer.echo(f"  {row['name']:24s} {row['accuracy']:5.1f} %  {row['speedup_macs']:.2f}x MACs  "
                   f"{row['speedup_wall']:.2f}x wall")
    typer.echo(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def _t2i_inputs(model: str, weights: Path | None, prompts: Path | None, out: Path) -> tuple[Path, Path, bool]:
    """A t2i zoo model as a pipeline folder, its prompts (the held-out captions, written to
    ``out/prompts.jsonl``, unless given) and whether the t2i evaluator can score them."""
    folder = t2i_folder(model, weights)
    if prompts is not None:
        return folder, prompts, in_caption_language(read_prompts(prompts))
    prompts = out / "prompts.jsonl"
    extra = PIXART_CALL if model == "pixart" else {}
    out.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({**call, **extra}) + "\n" for call in t2i_default_calls()))
    return folder, prompts, True


@app.command()
def report(
    results: Path = typer.Argument(..., help="a results.json written by `diffaccel bench`"),
    out: Path = typer.Option(None, help="output folder (default: the results file's folder). Elsewhere, the "
                                        "results.json is written there too, beside its results.md and report.html "
                                        "(so the three agree); a folder holding another run's results.json is "
                                        "refused"),
    tail: float = typer.Option(None, help="rank the summary again with the 5th-percentile image's PSNR bounded "
                                          "too (dB); default: as the bench ran. The results.json next to the "
                                          "bench's run keeps the bench's own ranking"),
) -> None:
    """Render results.md and report.html again from a saved results.json, without rerunning. Sample
    grids that are gone (a results file without its run folder) are left out of the page, with a
    warning: the tables need none."""

    def job():
        _check_tail(tail)
        saved = load_results(results)
        folder = out if out is not None else results.parent
        in_place = folder.resolve() == results.parent.resolve()
        ranked = saved if tail is None else resummarized(saved, tail)
        rendered = render_report(ranked, results.parent)  # all of it in memory first: a failure replaces nothing
        if not in_place:  # that folder's three files agree
            _refuse_another_run(folder, saved)
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / "results.json", relocated(ranked, results.parent, folder).model_dump(mode="json"))
        elif tail is not None:
            typer.echo(f"{results} keeps the bench's own ranking; the report shows the one under --tail {tail:g}",
                       err=True)
        keep = bool(rendered.missing) and in_place and (folder / "report.html").exists()  # it embeds its grids
        for why in rendered.missing:
            typer.echo(f"warning: a sample grid is gone ({why}): " + ("the existing report.html, which embeds it, is "
                       "kept; only results.md is rewritten" if keep else "report.html is written without it"), err=True)
        return save_report(folder, rendered, keep_page=keep), keep

    (md, page), kept = run_guarded(job)
    typer.echo(f"wrote {md}" + ("" if kept else f" and {page}"))


def _refuse_another_run(folder: Path, saved: Results) -> None:
    """``report A/results.json --out B`` replaces B's report: not when B holds another run's results
    (B's results.json had been left beside the tables of A's run)."""
    existing = folder / "results.json"
    if not existing.exists():
        return
    try:
        other = load_results(existing)
    except BenchError:
        other = None
    if other is None or (other.created, other.baseline.sha256) != (saved.created, saved.baseline.sha256):
        what = "an unreadable results.json" if other is None else f"the results of another run ({other.model}, " \
                                                                   f"{other.created})"
        raise BenchError(f"--out {folder} holds {what}; give an empty folder as --out, or leave --out out to write "
                         "beside the results file")

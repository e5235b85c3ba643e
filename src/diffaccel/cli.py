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
    weights: Path = typer.Option(None, help="weights folder (default: the shipped weights)"),
    threads: int = typer.Option(0, min=0, help="torch threads (0: torch's default)"),
) -> None:
    """Sample every class from an embedded model and score the images with the evaluator."""
    import torch

    from diffaccel.generate import GenerateConfig, run_generate
    from diffaccel.zoo import shapes
    from diffaccel.zoo.weights import load_evaluator, load_pipeline

    if threads:
        torch.set_num_threads(threads)
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    try:
        if names is not None and not names:
            raise ValueError(f"--classes is empty; choose from {', '.join(shapes.CLASSES)}")
        shapes.class_ids(names)
        if not torch.isfinite(torch.tensor(guidance)):
            raise ValueError(f"--guidance must be a finite number, got {guidance}")
        cfg = GenerateConfig(model=model.value, classes=names, per_class=per_class, steps=steps,
                             sampler=sampler.value, guidance=guidance, seed=seed)
        pipe = load_pipeline(cfg.model, cfg.sampler, weights)
        record = run_generate(cfg, out, pipe, load_evaluator())
    except (DiffaccelError, ValueError) as exc:
        fail(str(exc))
    typer.echo(
        f"{record['model']}: {record['n_images']} images, {record['steps']} {record['sampler']} steps, "
        f"guidance {record['guidance']:g} | accuracy {record['accuracy']:.1%} | "
        f"FD {record['fd']:.2f} (real-vs-real floor {record['fd_floor']:.2f}, {record['fd_samples']} samples) | "
        f"{record['macs_per_image'] / 1e9:.2f} GMACs/image | {record['seconds']:.1f} s")
    typer.echo(f"wrote {out / 'grid.png'} and {out / 'record.json'}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Train a model or the evaluator (options: see `diffaccel train --help-train`)."""
    from diffaccel.zoo.train import main

    args = ["--help" if a == "--help-train" else a for a in ctx.args]
    main(args)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

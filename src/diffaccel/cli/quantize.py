"""``diffaccel quantize``: calibrate timestep-aware PTQ and write a plan that applies it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from diffaccel.calibration.record import denoiser_calls
from diffaccel.cli.common import (
    GUIDANCE,
    MODEL,
    PIPELINE,
    PROMPTS,
    STEPS,
    THREADS,
    WEIGHTS,
    app,
    run_guarded,
    setup,
    target,
)
from diffaccel.methods.ptq import ptq
from diffaccel.quant import Calibration
from diffaccel.quant.sensitivity import sensitivity as rank_layers


@app.command()
def quantize(
    model: str = MODEL,
    pipeline: Path = PIPELINE,
    prompts: Path = PROMPTS,
    bits: str = typer.Option("w8a8", help="weight and activation bits: w8a8, w4a8, ..."),
    backend: str = typer.Option("fake", help="fake (simulated, any width), int8 (calibrated scales, int8 matmuls) "
                                             "or int8-dynamic (fbgemm, fastest on a CPU); int8 paths: W8A8 only"),
    per_step: bool = typer.Option(False, help="one activation scale per denoising step"),
    keep: list[str] = typer.Option(None, help="layer-name pattern to keep in floating point (repeatable)"),
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    per_class: int = typer.Option(2, min=1, help="calibration runs per class (embedded) or per prompt"),
    sensitivity: bool = typer.Option(False, help="also rank the layers by the error each adds alone"),
    out: Path = typer.Option(Path("out/quant"), help="folder for plan.json and its calibration file"),
    weights: Path = WEIGHTS,
    threads: int = THREADS,
) -> None:
    """Calibrate timestep-aware post-training quantization on the calibration calls (every class of
    an embedded model, or the prompts of a pipeline folder) and write a plan that applies it."""

    def job() -> None:
        setup(threads, guidance)
        tgt = target(model, pipeline, prompts, "ddim", weights)
        calls = tgt.workload(steps, guidance, per_class)
        the_plan = ptq(tgt.pipe, calls, bits=bits, backend=backend, per_step=per_step, keep=tuple(keep or ()))
        out.mkdir(parents=True, exist_ok=True)
        the_plan.save(out / "plan.json")
        typer.echo(f"wrote {out / 'plan.json'} and {out / 'plan.calibration.safetensors'} ({the_plan.quant.label}, "
                   f"{the_plan.quant.backend})")
        if sensitivity:
            recorded = denoiser_calls(tgt.pipe, tgt.workload(steps, guidance, 1, seed=1))  # calibration seeds
            rows = rank_layers(tgt.denoiser()[0], the_plan.quant, Calibration.load(the_plan.quant.calibration),
                               recorded)
            (out / "sensitivity.json").write_text(json.dumps(rows, indent=2))
            for row in [r for r in rows if r["relative_error"] is not None][:10]:
                typer.echo(f"  {row['relative_error']:.2e}  {row['layer']} ({row['bits']}-bit weights)")
            kept = sum(r["relative_error"] is None for r in rows)
            typer.echo(f"wrote {out / 'sensitivity.json'} ({len(rows)} layers, worst first"
                       + (f"; {kept} kept in floating point are listed last)" if kept else ")"))

    run_guarded(job, out_dir=out)

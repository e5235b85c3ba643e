"""``diffaccel generate``: run the target's calls, optionally under a plan and beside the baseline."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import torch.distributed as dist
import typer

from diffaccel.calibration.reference import identity_plan
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
    check_plan_file,
    class_names,
    parse_params,
    quant_backend_for,
    refuse_sampler_with_folder,
    resolve_plan,
    run_guarded,
    setup,
    target,
)
from diffaccel.cli.lm import LM_MODEL, generate_command
from diffaccel.errors import DiffaccelError, lost_peer
from diffaccel.generate import GenerateConfig, run_generate
from diffaccel.methods.ptq import ptq, quant_spec
from diffaccel.parallel import ParallelError, close, init, tag_logging
from diffaccel.parallel.job import ParallelConfig
from diffaccel.plan import Plan
from diffaccel.solvers import SolverSpec


class Precision(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"


class ParallelMode(str, Enum):
    cfg = "cfg"
    patch = "patch"
    batch = "batch"


PARALLEL = typer.Option(None, help="run as one of several processes (torchrun --nproc-per-node N -m diffaccel "
                                   "generate ...): cfg splits each denoiser batch, patch splits the image into bands "
                                   "(DiT), batch splits the images (docs/parallel.md)")
WARMUP = typer.Option(1, min=0, help="--parallel patch: synchronous steps at the start of each call before stale "
                                     "activations are used")
PRECISION = typer.Option(None, help="run the denoiser under autocast: bfloat16 or float16 (fast on GPUs and on "
                                    "CPUs with AVX-512 BF16 or AMX)")


@app.command()
def generate(
    ctx: typer.Context,
    model: str = ANY_MODEL,
    pipeline: Path = PIPELINE,
    prompts: Path = PROMPTS,
    classes: str = typer.Option(None, help="embedded models: comma-separated class names (default: all)"),
    per_class: int = typer.Option(8, min=1, help="images per class (embedded) or per prompt; dlm: problems per task"),
    steps: int = ANY_STEPS,
    sampler: SamplerName = SAMPLER,
    guidance: float = GUIDANCE,
    seed: int = typer.Option(0, min=0, help="base seed; each image's noise follows from it"),
    out: Path = typer.Option(Path("out/generate"), help="output folder"),
    method: str = typer.Option(None, help="acceleration method (see `diffaccel methods`)"),
    plan: Path = typer.Option(None, "--plan", help="a plan JSON file to apply (mapped to --steps if made for others)"),
    compare: bool = typer.Option(False, help="also run the unaccelerated pipeline on the same seeds, interleaved"),
    interval: int = typer.Option(None, help="method setting: full-compute interval"),
    branch: int = typer.Option(None, help="method setting: U-Net skip branch (deepcache)"),
    order: int = typer.Option(None, help="method setting: Taylor order (taylorseer)"),
    threshold: float = typer.Option(None, help="method setting: residual threshold (first_block_cache, erta)"),
    keys: int = typer.Option(None, help="method setting: key steps (keysteps)"),
    param: list[str] = typer.Option(None, help="other method settings, key=value (repeatable)"),
    save_plan: Path = typer.Option(None, help="also write the plan used to this file"),
    batch_size: int = typer.Option(64, min=1, help="embedded models: images per pipeline call"),
    weights: Path = WEIGHTS,
    threads: int = THREADS,
    quant: str = typer.Option(None, help="also quantize the model: w8a8, w4a8, ... (calibrated on first use)"),
    quant_backend: str = typer.Option(None, help="with --quant: fake (default; simulated, any width), int8 (W8A8, "
                                                 "int8 matmuls) or int8-dynamic (fbgemm, fastest on a CPU)"),
    quant_per_step: bool = typer.Option(False, help="one activation scale per denoising step"),
    precision: Precision = PRECISION,
    parallel: ParallelMode = PARALLEL,
    warmup_steps: int = WARMUP,
) -> None:
    """Sample every class of an embedded model (or the prompts of a pipeline folder), optionally with
    a plan, and score the images: grid.png and record.json in --out."""

    def job() -> dict | None:
        refuse_sampler_with_folder(ctx, pipeline)
        setup(threads, guidance)
        tag_logging(init())
        names = class_names(classes)
        settings = parse_params(param, interval=interval, branch=branch, order=order, threshold=threshold, keys=keys)
        _check_inputs(plan, not (method or plan or quant or precision), compare, save_plan, out)
        tgt = target(model, pipeline, prompts, sampler, weights)
        num_steps = call_steps(tgt, steps)
        cfg = GenerateConfig(classes=names, per_class=per_class, steps=num_steps, sampler=sampler.value,
                             guidance=guidance, seed=seed, batch_size=batch_size)
        the_plan = resolve_plan(tgt, num_steps, guidance, method, plan, settings)
        calls = tgt.workload(num_steps, guidance, per_class=2 if tgt.embedded else 1) if quant else None
        the_plan = _whole_model(tgt, the_plan, calls, quant, quant_backend, quant_per_step,
                                precision.value if precision is not None else None)
        mode = ParallelConfig(parallel.value, warmup_steps) if parallel is not None else None
        record = run_generate(tgt, cfg, out, plan=the_plan, compare=compare, parallel=mode)
        if record is not None and "plan" in record and save_plan is not None:  # the plan that ran, as it ran
            Plan.from_dict(record["plan"]).save(save_plan)
        return record

    if model == LM_MODEL and pipeline is None:
        return run_guarded(generate_command, ctx, out_dir=out)
    _report(run_guarded(_rank_tagged, job, out_dir=out), out, compare)


def _check_inputs(plan: Path | None, no_plan: bool, compare: bool, save_plan: Path | None, out: Path) -> None:
    """Refuse a broken plan file, ``--compare`` or ``--save-plan`` with no plan, a file where ``--out`` goes,
    or a folder where ``--save-plan`` (written after the run) would go, before any model loads."""
    check_plan_file(plan)
    if no_plan and (compare or save_plan is not None):
        raise ValueError(f"{'--compare' if compare else '--save-plan'} needs a plan: give --method, --plan, --quant "
                         "or --precision")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for grid.png and record.json")
    if save_plan is not None and save_plan.is_dir():
        raise ValueError(f"--save-plan {save_plan} is a folder: name a .json file")
    if save_plan is not None and not _can_write_in(save_plan.parent):
        raise ValueError(f"--save-plan {save_plan}: cannot write a file in {save_plan.parent}; name another place")


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be made in ``folder`` (or in the folders it would be made under): tried, not
    guessed from permissions, which a root user or a special file system (/proc) bypass."""
    existing = next((f for f in (folder, *folder.parents) if f.exists()), Path("."))
    try:
        with tempfile.TemporaryFile(dir=existing):
            return True
    except OSError:
        return False


def _report(record: dict | None, out: Path, compare: bool) -> None:
    if record is None:  # a rank other than 0: rank 0 reports
        return
    typer.echo(summary_line(record))
    if (out / "comparison.png").is_file() and compare:
        typer.echo(f"side by side (baseline | accelerated | difference x10): {out / 'comparison.png'}")
    typer.echo(f"wrote {out / 'grid.png'} and {out / 'record.json'}")


def _rank_tagged(job: Callable[[], Any]) -> Any:
    """Run ``job``; in a group of several processes its errors name the rank they happened on, and a
    lost peer is a one-line error too. The group is left at the end."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            return job()
        try:
            return job()
        except (DiffaccelError, ValueError, OSError) as exc:
            raise ParallelError(f"{_tag()} {exc}") from None
        except (dist.DistError, RuntimeError) as exc:
            if not isinstance(exc, dist.DistError) and not lost_peer(exc):
                raise
            raise ParallelError(f"{_tag()} lost contact with the other ranks ({str(exc).splitlines()[0][:200]}); "
                                "another rank probably failed (see its error) or stopped answering") from None
    finally:
        close()


def _tag() -> str:
    if dist.is_available() and dist.is_initialized():
        return f"[rank {dist.get_rank()}/{dist.get_world_size()}]"
    return "[rank ?]"


def _whole_model(tgt, plan: Plan | None, calls: Any, quant: str | None, backend: str | None, per_step: bool,
                 precision: str | None) -> Plan | None:
    """``plan`` (or one that computes everything) with the command line's quantization and precision."""
    backend = quant_backend_for(quant, backend)
    if quant is None and precision is None:
        return plan
    if plan is None and quant is not None:  # made as `diffaccel quantize` makes it: with the record of its calls
        plan = ptq(tgt.pipe, calls, bits=quant, backend=backend, per_step=per_step)
        return plan if precision is None else Plan.from_dict({**plan.model_dump(), "precision": precision})
    plan = plan or identity_plan(tgt.denoiser()[0]).model_copy(update={"method": "precision"})
    if quant is not None:
        if plan.quant is not None:
            raise ValueError(f"the plan is already quantized ({plan.quant.label} {plan.quant.backend}): drop --quant, "
                             "or give a plan without a quantization section")
        plan = plan.with_quant(quant_spec(tgt.pipe, calls, quant, backend, per_step))
    return plan if precision is None else Plan.from_dict({**plan.model_dump(), "precision": precision})


def _values(value: float | list[float]) -> str:
    """One setting of the run's calls, or each of them (``4/5``) where they differ."""
    return "/".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"


def summary_line(record: dict) -> str:
    head = (f"{record['model']}: {record['n_images']} images, {_values(record['steps'])} {record['sampler']} steps, "
            f"guidance {_values(record['guidance'])}")
    if "plan" in record:
        plan = record["plan"]
        head += f" | plan {plan['method']}"
        if plan.get("solver"):
            head += f" + {SolverSpec.model_validate(plan['solver']).label}"
        quant = plan.get("quant") or {}
        if quant and plan["method"] != "ptq":
            head += f" + w{quant['weight_bits']}a{quant['act_bits']} {quant['backend']}"
        if plan.get("precision"):
            head += f" in {plan['precision']}"
        if record.get("resampled_from"):
            head += f" (made for {record['resampled_from']} denoiser evaluations, mapped)"
    parts = [head]
    if "speedup_wall" in record:
        macs = f"{record['speedup_macs']:.2f}x MACs" if "speedup_macs" in record else "MACs not counted across ranks"
        parts.append(f"speedup {record['speedup_wall']:.2f}x wall, {macs}")
        parts.append(f"PSNR {record['psnr']:.1f} dB (5th pct {record.get('psnr_p5', record['psnr_min']):.1f}), "
                     f"SSIM {record['ssim']:.3f} vs unaccelerated")
    elif "speedup_macs" in record:
        parts.append(f"speedup {record['speedup_macs']:.2f}x MACs")
    for key in ("adherence", "accuracy"):  # adherence: the t2i models' (every attribute of the prompt read back)
        if key in record:
            score = f"{key} {record[key]:.1%}"
            if key in record.get("baseline", {}):
                score += f" (unaccelerated {record['baseline'][key]:.1%})"
            parts.append(score)
    if "fd" in record:
        parts.append(f"FD {record['fd']:.2f} (floor {record['fd_floor']:.2f}, {record['fd_samples']} samples)")
    parts.append(f"{record['macs_per_image'] / 1e9:.3f} GMACs/image, {record['seconds']:.1f} s")
    return " | ".join(parts)

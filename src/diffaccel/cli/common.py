"""What the commands share: the app, the target options, settings parsing and one-line errors."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import typer

from diffaccel.errors import DiffaccelError, PlanError
from diffaccel.eval.allocator import keep_freed_memory
from diffaccel.methods.registry import build
from diffaccel.plan import Plan
from diffaccel.steps import model_evaluations
from diffaccel.targets import T2I_MODELS, Target, load_target
from diffaccel.zoo import shapes

COMMAND_STARTED: float | None = None  # set by ``cli.script`` for the process's own command

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Make diffusion sampling cheaper, and show what it cost in quality.")
log = logging.getLogger("diffaccel")

# models embedded in the package; the text-to-image and language models join as they ship
EMBEDDED = ("dit", "unet")


class SamplerName(str, Enum):
    ddim = "ddim"
    dpm = "dpm"


MODEL = typer.Option("dit", help=f"embedded model: {', '.join(EMBEDDED)}, or text-to-image: pixart, sd "
                                  "(ignored with --pipeline)")
ANY_MODEL = typer.Option("dit", help=f"embedded model: {', '.join(EMBEDDED)}, text-to-image: pixart, sd (ignored "
                                      "with --pipeline), or dlm (the diffusion language model)")
PIPELINE = typer.Option(None, help="a local diffusers pipeline folder (DiffusionPipeline.from_pretrained, offline)")
PROMPTS = typer.Option(None, help="with --pipeline or --model pixart|sd: prompts, one per line, or JSON lines of "
                                  "pipeline call arguments (pixart|sd default: 12 held-out captions)")
SAMPLER = typer.Option(SamplerName.ddim, help="embedded and pixart|sd models: ddim or dpm (DPM-Solver++); a "
                                              "pipeline folder keeps its own scheduler")
WEIGHTS = typer.Option(None, help="--model: weights folder, for pixart|sd a pipeline folder (default: the shipped "
                                  "weights)")
STEPS = typer.Option(50, min=1, help="denoising steps (num_inference_steps)")
DEFAULT_STEPS = 50
ANY_STEPS = typer.Option(None, min=1, help="denoising steps (num_inference_steps; default 50, dlm: one answer "
                                          "token per step)")
GUIDANCE = typer.Option(3.0, help="classifier-free guidance scale (<= 1 disables it)")
THREADS = typer.Option(0, min=0, help="torch threads (0: torch's default)")
MAX_THREADS = 4096


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def setup(threads: int = 0, guidance: float | None = None) -> None:
    """Common start of a command: logging and one-line warnings to stderr, thread count, a finite
    guidance, and an allocator that keeps freed memory (steady CPU timings, ``eval/allocator.py``)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.showwarning = _one_line_warning
    keep_freed_memory()
    if threads > MAX_THREADS:  # torch's thread pool segfaulted at 100000
        raise ValueError(f"--threads {threads} is more than {MAX_THREADS}: give at most the machine's cores "
                         f"({os.cpu_count()} here)")
    if threads:
        torch.set_num_threads(threads)
    if guidance is not None and not math.isfinite(guidance):
        raise ValueError(f"--guidance must be a finite number, got {guidance}")


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """A warning on the command line: what it says (and, in a group of processes, which rank says it),
    not the source line that raised it."""
    typer.echo(f"warning: {rank_tag()}{message}", err=True)


def rank_tag() -> str:
    """``[rank r/w] `` in a group of processes torchrun started (from its environment), else nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '?')}/{world}] " if world > 1 else ""


def target(model: str, pipeline: Path | None, prompts: Path | None, sampler: SamplerName | str = "ddim",
           weights: Path | None = None) -> Target:
    if pipeline is None and model == "dlm":
        raise ValueError("--model dlm (the diffusion language model) works with generate, search, bench and train")
    if pipeline is None and model not in EMBEDDED + T2I_MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(EMBEDDED + T2I_MODELS)}, or give "
                         "--pipeline PATH (dlm, the language model, works with generate, search, bench and train)")
    if pipeline is not None and weights is not None:
        raise ValueError("--weights is for --model; a pipeline folder holds its own weights")
    return load_target(model, pipeline, prompts, getattr(sampler, "value", sampler), weights)


def call_steps(tgt: Target, steps: int | None) -> int:
    """The steps the command's calls run: ``--steps``, else the count every line of the prompt file
    sets, else 50. A prompt file's own count wins on its lines (said, when ``--steps`` asks another)."""
    return steps_of(tgt.calls, steps)


def steps_of(calls: list[dict] | None, steps: int | None) -> int:
    """``call_steps`` for the lines of a prompt file (None: an embedded model's calls)."""
    own = {call.get("num_inference_steps") for call in calls or [{}]}
    if len(own) == 1 and None not in own:
        (file_steps,) = own
        if steps is not None and steps != file_steps:
            typer.echo(f"warning: the prompt file sets num_inference_steps {file_steps} on every line, which wins "
                       f"over --steps {steps}", err=True)
        return file_steps if type(file_steps) is int else steps or DEFAULT_STEPS  # a bad value: the pipeline says
    if steps is not None and any(s is not None and s != steps for s in own):
        typer.echo(f"warning: some lines of the prompt file set their own num_inference_steps, which win over "
                   f"--steps {steps} on those lines", err=True)
    return steps or DEFAULT_STEPS


def quant_backend_for(quant: str | None, backend: str | None) -> str:
    """``--quant-backend`` (fake by default), refused without ``--quant``: it would be ignored."""
    if quant is None and backend is not None:
        raise ValueError("--quant-backend goes with --quant (e.g. --quant w8a8 --quant-backend int8-dynamic)")
    return backend or "fake"


def parse_params(params: list[str] | None, **named: Any) -> dict:
    """Method settings from named options (None: not given) and ``--param key=value`` pairs (JSON values)."""
    settings = {k: v for k, v in named.items() if v is not None}
    for item in params or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param needs key=value, got {item!r}")
        if key.strip() in settings:
            option = f"--{key.strip().replace('_', '-')}" if key.strip() in named else f"--param {key.strip()}"
            raise ValueError(f"{key.strip()} is given twice ({option} and --param {item}): give it once")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value
    return settings


def check_plan_file(path: Path | None) -> None:
    """Load ``path`` (if given) only to refuse a broken plan file before any model loads."""
    if path is not None:
        Plan.load(path)


def resolve_plan(tgt: Target, steps: int, guidance: float, method: str | None, plan_file: Path | None,
                 settings: dict) -> Plan | None:
    """The plan a command runs: loaded from ``plan_file`` or made with ``method`` (on the target's
    calibration calls when the method calibrates)."""
    if method and plan_file:
        raise ValueError("give either --method or --plan, not both")
    if plan_file is not None:
        if settings:
            raise ValueError("method settings (--interval, --param, ...) go with --method, not --plan")
        plan = Plan.load(plan_file)
        if plan.solver is not None and plan.solver.steps != steps:
            log.info("the plan's solver runs its own %d steps (the run's step count is not used)", plan.solver.steps)
        elif plan.num_steps is not None and plan.num_steps != model_evaluations(tgt.denoiser()[1], steps):
            log.info("plan made for %d denoiser evaluations; runs of another count map it (Plan.resample)",
                     plan.num_steps)
        return plan
    if method:
        calls = None if tgt.embedded or not tgt.calls else tgt.workload(steps, guidance, per_class=1)
        return build(method, tgt.pipe, steps, guidance=guidance, calls=calls, **settings)
    if settings:
        raise PlanError("method settings were given without --method")
    return None


def run_guarded(fn: Callable[..., Any], *args: Any, out_dir: Path | None = None, **kwargs: Any) -> Any:
    """Call ``fn``; a DiffaccelError, ValueError or OSError becomes a one-line error and exit code 2,
    and ``out_dir``, when this run made it and left it empty, is removed again."""
    fresh = out_dir is not None and not Path(out_dir).exists()
    try:
        return fn(*args, **kwargs)
    except (DiffaccelError, ValueError, OSError) as exc:
        if fresh and Path(out_dir).is_dir() and not any(Path(out_dir).iterdir()):
            Path(out_dir).rmdir()
        fail(os_message(exc) if isinstance(exc, OSError) else str(exc))


def os_message(exc: OSError) -> str:
    """A file-system error as the path and what is wrong with it (no errno)."""
    if exc.filename is None or not exc.strerror:
        return str(exc)
    hint = " (a file stands where a folder is needed)" if isinstance(exc, (FileExistsError, NotADirectoryError)) else ""
    return f"{exc.filename}: {exc.strerror.lower()}{hint}"


def class_names(classes: str | None) -> list[str] | None:
    """``--classes`` as a list of names (None: not given, every class), checked against the classes."""
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes is not None else None
    if names is not None and not names:
        raise ValueError(f"--classes is empty; choose from {', '.join(shapes.CLASSES)}")
    if names is not None:
        shapes.class_ids(names)  # unknown or repeated names are refused before any model loads
    return names


def refuse_sampler_with_folder(ctx: typer.Context, pipeline: Path | None) -> None:
    """A pipeline folder runs the scheduler saved in it: a ``--sampler`` given with one would be ignored."""
    given = getattr(ctx.get_parameter_source("sampler"), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")
    if pipeline is not None and given:
        raise ValueError("--sampler applies to the shipped models; a --pipeline folder runs the scheduler saved in "
                         "it (edit its scheduler/scheduler_config.json, or use a plan with a solver section): drop "
                         "--sampler")


def command_started() -> float:
    """When this command started: for the ``diffaccel`` process itself (``cli.script``), when importing
    diffaccel began, since torch and diffusers take seconds to import before any command runs (a time
    limit counts them); for a command run in-process (``cli.main``), now. Read once."""
    global COMMAND_STARTED
    started, COMMAND_STARTED = COMMAND_STARTED, None
    return started if started is not None else time.time()

"""``diffaccel plan make | show`` and ``diffaccel methods``."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaccel.cli.common import (
    ANY_MODEL,
    GUIDANCE,
    PIPELINE,
    PROMPTS,
    SAMPLER,
    WEIGHTS,
    SamplerName,
    app,
    call_steps,
    parse_params,
    refuse_sampler_with_folder,
    resolve_plan,
    run_guarded,
    setup,
    target,
)
from diffaccel.cli.lm import LM_MODEL, describe_lm_plan, is_lm_plan_file, plan_make_command
from diffaccel.lm.plan import LM_METHODS, LM_SETTINGS, LMPlan
from diffaccel.methods.registry import METHODS
from diffaccel.plan import Plan
from diffaccel.report.plan_view import render_plan
from diffaccel.targets import Target, load_pipeline_folder

plan_app = typer.Typer(help="Make and inspect plans.", no_args_is_help=True)
app.add_typer(plan_app, name="plan")


@plan_app.command("show")
def plan_show(path: Path = typer.Argument(..., help="plan JSON file"),
              model: str = typer.Option(None, help="shipped model to measure MACs on: dit, unet, sd or pixart "
                                                   "(default: each one the plan fits)")) -> None:
    """Print a plan's step x unit map and the MACs it costs relative to the full model (an LM plan:
    its method and settings)."""
    if is_lm_plan_file(path):
        typer.echo(run_guarded(lambda: describe_lm_plan(LMPlan.load(path), path, model)))
        return
    typer.echo(run_guarded(lambda: render_plan(Plan.load(path), model)))


@plan_app.command("make")
def plan_make(
    ctx: typer.Context,
    method: str = typer.Argument(..., help="method name (see `diffaccel methods`)"),
    model: str = ANY_MODEL,
    pipeline: Path = PIPELINE,
    prompts: Path = PROMPTS,
    steps: int = typer.Option(None, min=1, help="denoising steps the plan is made for (image models; default 50; "
                                                "a dlm plan runs at any step count)"),
    sampler: SamplerName = SAMPLER,
    guidance: float = GUIDANCE,
    weights: Path = WEIGHTS,
    interval: int = typer.Option(None, help="method setting: full-compute interval"),
    branch: int = typer.Option(None, help="method setting: U-Net skip branch (deepcache)"),
    order: int = typer.Option(None, help="method setting: Taylor order (taylorseer)"),
    threshold: float = typer.Option(None, help="method setting: residual threshold"),
    keys: int = typer.Option(None, help="method setting: key steps (keysteps)"),
    param: list[str] = typer.Option(None, help="other settings, key=value (repeatable)"),
    out: Path = typer.Option(Path("plan.json"), help="where to write the plan"),
) -> None:
    """Make a plan with a method for an embedded model or a pipeline folder, and save it."""

    def job() -> None:
        refuse_sampler_with_folder(ctx, pipeline)
        setup(guidance=guidance)
        settings = parse_params(param, interval=interval, branch=branch, order=order, threshold=threshold, keys=keys)
        static = method in METHODS and not METHODS[method].calibrated
        if pipeline is not None and prompts is None and static:  # nothing to calibrate: no calls needed
            tgt = Target(pipeline.name, load_pipeline_folder(pipeline), [], str(pipeline))
        else:
            tgt = target(model, pipeline, prompts, sampler, weights)
        resolve_plan(tgt, call_steps(tgt, steps), guidance, method, None, settings).save(out)

    if model == LM_MODEL and pipeline is None:
        run_guarded(plan_make_command, ctx)
    else:
        run_guarded(job)
    typer.echo(f"wrote {out}")


@app.command("methods")
def list_methods() -> None:
    """List the acceleration methods, what they need and their settings."""
    for name, spec in METHODS.items():
        needs = "/".join(sorted(spec.needs)) or "any model"
        kind = "calibrated" if spec.calibrated else "static"
        typer.echo(f"{name:18s} {spec.summary} [{kind}; {needs}]")
        for knob, field in spec.settings.model_fields.items():
            default = spec.knobs()[knob]
            typer.echo(f"    {knob}={default!r}  {field.description or ''}")
    methods = ", ".join(m for m in LM_METHODS if m != "none")
    typer.echo(f"\n--model dlm (the diffusion language model) takes its own: {methods} (see docs/language-models.md);"
               " settings with --param key=value:")
    for knob in LM_SETTINGS:
        field = LMPlan.model_fields[knob]
        typer.echo(f"    {knob}={field.default!r}  {field.description}")

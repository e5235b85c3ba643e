"""diffaccel's own candidates in a bench group: a method's plan under the executor, or the
pipeline's sampler at fewer steps; and the dispatch to the peers."""

from __future__ import annotations

from typing import Any

from diffaccel.bench.peers import PEERS, Candidate, Context
from diffaccel.bench.sweeps import PLAN_FILE, STEP_KNOBS, STEP_NAMES
from diffaccel.calibration.reference import identity_plan
from diffaccel.calibration.workload import Workload
from diffaccel.errors import BenchError
from diffaccel.methods.registry import METHODS, build
from diffaccel.plan import Plan
from diffaccel.runtime.executor import Executor
from diffaccel.solvers.spec import SolverSpec


def ours(ctx: Context, name: str, settings: dict) -> Candidate:
    """A method's plan, made on the calibration calls (embedded models: their default workload)."""
    pipe = ctx.fresh_pipe()
    calls = None if ctx.embedded else Workload(tuple(ctx.calib_calls), "the bench's calibration calls")
    plan = build(name, pipe, ctx.steps, guidance=ctx.guidance, calls=calls, **settings)
    notes = "plan calibrated on calibration seeds (not timed)" if METHODS[name].calibrated else ""
    return planned(ctx, pipe, plan, notes)


def plan_file(ctx: Context, settings: dict) -> Candidate:
    """A plan read from a file (a searched plan), beside the methods and peers in the same run."""
    return planned(ctx, ctx.fresh_pipe(), Plan.load(settings["file"]),
                   "plan read from a file (made before the run, not timed)")


def planned(ctx: Context, pipe: Any, plan: Plan, notes: str) -> Candidate:
    """Sampling with ``plan`` under the executor; reports the executor's own MAC count beside the bench's,
    against the baseline's forwards (``ctx.shared["base_forwards"]`` per call, else one per step): the
    executor's own full count is at the plan's step count, which had made every fewer-step row 1.0."""
    model, scheduler = ctx.denoiser(pipe), pipe.scheduler
    executor = Executor(model, plan)
    spent = {"macs": 0, "baseline_macs": 0.0}

    def run(call):
        executor.install(scheduler, pipe)
        try:
            return ctx.sample(pipe, call)
        finally:
            executor.remove()
            stats = executor.stats
            spent["macs"] += stats.macs
            if stats.forwards:  # the baseline's forwards at this call's full cost of one forward
                spent["baseline_macs"] += stats.full_macs / stats.forwards * ctx.shared.get("base_forwards", ctx.steps)

    def extra() -> dict[str, Any]:
        return {"speedup_macs_executor": spent["baseline_macs"] / spent["macs"] if spent["macs"] else None}

    return Candidate(run, notes=notes, extra=extra)


def fewer_steps(ctx: Context, name: str, settings: dict) -> Candidate:
    """A plain sampler at fewer steps: an all-compute plan whose solver section sets it."""
    steps = int({**STEP_KNOBS, **settings}["steps"])
    if steps < 1:
        raise BenchError(f"steps must be >= 1, got {steps}")
    pipe = ctx.fresh_pipe()
    plan = identity_plan(ctx.denoiser(pipe)).model_copy(
        update={"solver": SolverSpec(name=STEP_NAMES[name], steps=steps), "method": name})
    notes = f"{STEP_NAMES[name]} at {steps} steps vs the {ctx.sampler} {ctx.steps}-step baseline"
    return planned(ctx, pipe, plan, notes)


def open_candidate(family: str, name: str, settings: dict, ctx: Context) -> Candidate:
    if name == PLAN_FILE:
        return plan_file(ctx, settings)
    if family == "diffaccel":
        return ours(ctx, name, settings)
    if family == "steps":
        return fewer_steps(ctx, name, settings)
    return PEERS[name].open(ctx, settings)

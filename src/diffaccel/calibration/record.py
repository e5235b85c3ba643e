"""Recordings along the calibration workload's trajectories, step by step.

Every recorder runs the workload under an executor (an identity plan unless told otherwise), so
steps are counted as plans count them: one denoiser evaluation of the run, whatever the scheduler
repeats or inserts and however the pipeline calls its guidance branches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from diffaccel.adapters import find_denoiser
from diffaccel.calibration.reference import identity_plan
from diffaccel.calibration.workload import Workload
from diffaccel.errors import CalibrationError
from diffaccel.fingerprint import fingerprint
from diffaccel.plan import Plan
from diffaccel.quant.calibrate import Calibration, quantizable, shortcut_splits
from diffaccel.runtime.cache import primary
from diffaccel.runtime.executor import Executor


def run_each(pipe: Any, workload: Workload, plan: Plan | None, before_call: Callable[[Executor], None] | None = None,
             progress: bool = False, **options: Any) -> Executor:
    """Run every call of ``workload`` under ``plan`` (identity if None); returns the executor."""
    model, scheduler = find_denoiser(pipe)
    executor = Executor(model, plan or identity_plan(model), **options)
    executor.install(scheduler, pipe)
    try:
        for call in tqdm(workload.calls, desc="calibrating", disable=not progress or len(workload) < 2):
            if before_call is not None:
                before_call(executor)
            call.run(pipe)  # a pipeline's error on its arguments names the call
    finally:
        executor.remove()
    return executor


@torch.no_grad()
def activation_ranges(pipe: Any, workload: Workload, act_bits: int = 8, split_shortcut: bool = True,
                      progress: bool = True) -> Calibration:
    """Timestep-aware PTQ calibration: every Linear / Conv2d input range at every step of the
    workload's trajectories (and, for a U-Net's skip concatenations, of each half)."""
    model, _ = find_denoiser(pipe)
    layers = quantizable(model)
    splits = shortcut_splits(model) if split_shortcut else {}
    per_step: dict[str, dict[int, torch.Tensor]] = {name: {} for name in layers}
    clock: dict[str, Executor | None] = {"executor": None}

    def recorder(name: str):
        def hook(module, args, kwargs):
            executor = clock["executor"]
            step = executor.current_step if executor is not None else None
            if step is None:
                return
            x = (args[0] if args else kwargs["input"]).detach().float()  # layer(input=...): AnimateDiff's proj_in
            if name in splits:
                cut = splits[name]
                values = torch.stack([x[:, :cut].abs().amax(), x[:, cut:].abs().amax()])
            else:
                values = x.abs().amax().reshape(1)
            seen = per_step[name].get(step)
            per_step[name][step] = values.cpu() if seen is None else torch.maximum(seen, values.cpu())
        return hook

    handles = [layer.register_forward_pre_hook(recorder(name), with_kwargs=True) for name, layer in layers.items()]
    try:
        executor = run_each(pipe, workload, None, lambda e: clock.update(executor=e), progress)
    finally:
        for handle in handles:
            handle.remove()
    steps = executor.stats.steps
    if steps == 0:
        raise CalibrationError("the calibration workload never ran the denoiser")
    absmax = {}
    for name in layers:
        rows = [per_step[name].get(s, torch.zeros(2 if name in splits else 1)) for s in range(steps)]
        ranges = torch.stack(rows)
        absmax[name] = torch.cat([ranges, ranges.amax(dim=0, keepdim=True)])
    return Calibration(type(model).__name__, fingerprint(model), act_bits, steps, absmax, splits)


@torch.no_grad()
def denoiser_calls(pipe: Any, workload: Workload, every: int = 10) -> list[tuple[int, tuple, dict]]:
    """The denoiser's (step, args, kwargs) at every ``every``-th step of the workload (for
    per-layer sensitivity)."""
    model, _ = find_denoiser(pipe)
    calls: list = []
    clock: dict[str, Executor | None] = {"executor": None}

    def hook(module, args, kwargs):
        step = clock["executor"].clock.step if clock["executor"] is not None else len(calls)
        if step % every == 0:
            calls.append((step, args, kwargs))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_each(pipe, workload, None, lambda e: clock.update(executor=e))
    finally:
        handle.remove()
    return calls


@torch.no_grad()
def trajectories(pipe: Any, workload: Workload, plan: Plan | None = None) -> dict[str, list[torch.Tensor]]:
    """Per step, over all calls and guidance branches: the residual of the whole unit stack (last
    unit's output minus first unit's input, residual units only), the model output and the latent
    the scheduler stepped from (ERTACache's profile and fits)."""
    model, _ = find_denoiser(pipe)
    record: dict[str, dict[int, list[torch.Tensor]]] = {k: defaultdict(list) for k in ("residual", "output", "latent")}
    state: dict[str, Any] = {"executor": None, "head": None}

    def clock() -> int:
        return state["executor"].clock.step

    probe = Executor(model, plan or identity_plan(model))
    units = probe.units
    handles = []
    if units[0].residual_inputs is not None:
        handles.append(units[0].module.register_forward_pre_hook(
            lambda m, a, k: state.__setitem__("head", primary(units[0].residual_inputs(a, k))), with_kwargs=True))
        handles.append(units[-1].module.register_forward_hook(
            lambda m, a, k, out: record["residual"][clock()].append(primary(out) - state["head"]), with_kwargs=True))
    handles.append(model.register_forward_hook(
        lambda m, a, out: record["output"][clock()].append((out.sample if hasattr(out, "sample") else out[0]).clone())))

    def start(executor: Executor) -> None:
        state["executor"] = executor
        if not executor.step_observers:
            executor.step_observers.append(lambda step, sample, prev: record["latent"][step].append(sample.clone()))

    try:
        run_each(pipe, workload, plan, start)
    finally:
        for handle in handles:
            handle.remove()
    return {key: [torch.cat(per[s]) for s in sorted(per)] for key, per in record.items()}

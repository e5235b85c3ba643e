"""Faster Diffusion's parallel decoding: a U-Net step that reuses the whole encoder never reads its
input latent, so a run of such steps can run as one batch (each copy with its own timestep); the
later steps of the run then return their precomputed outputs."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from diffaccel.errors import PlanError
from diffaccel.plan import Plan
from diffaccel.runtime.features.base import Feature, batch_mapped, model_sample, same_inputs, with_model_sample
from diffaccel.runtime.state import BranchState


@dataclass
class DecodeState:
    pending: dict[int, Any] = field(default_factory=dict)  # step -> precomputed output
    made_from: dict[str, Any] = field(default_factory=dict)  # the conditioning they were computed with
    step_macs: float = 0.0  # an unaccelerated step's MACs, as the batched forward charged them
    stale: bool = False  # the conditioning changed between steps (ControlNet's residuals do at every one)


class ParallelDecode(Feature):
    def __init__(self, plan: Plan, executor: Any) -> None:
        super().__init__(plan, executor)
        if "parallel-decode" not in executor.adapter.capabilities:
            raise PlanError(f"parallel decoding needs a U-Net; the {executor.adapter.name} adapter has no decoder")
        encoder = [i for i, u in enumerate(executor.units) if u.role == "encoder"]
        self.decoder_only = [all(row[i] == "R" for i in encoder) for row in plan.schedule]

    @classmethod
    def applies(cls, plan: Plan) -> bool:
        return plan.parallel_decode and plan.schedule is not None

    @classmethod
    def part(cls, plan: Plan) -> Any:
        return (plan.parallel_decode, tuple(plan.schedule or ()))

    def run_length(self, step: int) -> int:
        """Length of the run of decoder-only steps starting at ``step`` (1 if none)."""
        run = 0
        while step + run < len(self.decoder_only) and self.decoder_only[step + run]:
            run += 1
        return max(run, 1)

    def forward(self, original: Callable, bound: inspect.BoundArguments, state: BranchState) -> Any:
        own = state.of(self, DecodeState)
        executor = self.executor
        adapter = executor.adapter
        sample = bound.arguments[adapter.sample_arg]
        batch = sample.shape[0]
        conditioning = {name: value for name, value in bound.arguments.items()
                        if name not in (adapter.sample_arg, adapter.timestep_arg)}
        if own.pending and not same_inputs(conditioning, own.made_from):
            # a callback or a ControlNet changed the conditioning: the steps computed ahead are stale, their
            # work was done for nothing (not an unaccelerated step's), and batching ahead stops for this run
            executor.stats.full_macs -= round(own.step_macs * len(own.pending))
            own.pending.clear()
            own.stale = True
        if state.step in own.pending:  # computed ahead, in an earlier batched forward
            executor.stats.forwards += 1
            return own.pending.pop(state.step)
        run = self.run_length(state.step)
        if run == 1 or own.stale:
            return None
        timesteps = executor.timesteps()
        if timesteps is None:
            raise PlanError("parallel decoding needs the timesteps: pass the pipeline, or a plan with timesteps")
        own.made_from = conditioning
        t_arg = bound.arguments[adapter.timestep_arg]
        dtype = t_arg.dtype if isinstance(t_arg, torch.Tensor) else torch.float32
        times = torch.tensor(timesteps[state.step:state.step + run], dtype=dtype, device=sample.device)
        for name, value in conditioning.items():
            bound.arguments[name] = batch_mapped(value, batch, lambda t: t.repeat(run, *([1] * (t.dim() - 1))))
        bound.arguments[adapter.sample_arg] = sample.repeat(run, *([1] * (sample.dim() - 1)))
        bound.arguments[adapter.timestep_arg] = times.repeat_interleave(batch)
        state.tile, charged = run, executor.stats.full_macs
        try:
            out = executor.run_forward(original, bound.args, bound.kwargs, state, (batch * run, *sample.shape[1:]))
        finally:
            state.tile = 1
        own.step_macs = (executor.stats.full_macs - charged) / run
        chunks = model_sample(out).chunk(run)
        for k in range(1, run):
            own.pending[state.step + k] = with_model_sample(out, chunks[k])
        return with_model_sample(out, chunks[0])

"""What a feature is: one part of a plan, applied by the executor through a few narrow hooks.

The executor core only counts steps, keeps per-branch caches, dispatches units and counts MACs.
Everything else a plan can ask for is a ``Feature`` built from one plan field: it overrides the
hooks it needs and keeps its own per-branch state (``BranchState.of``). Adding a plan field means
adding a feature, its schema part and its tests; the core stays as it is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

import torch

from diffaccel.adapters import Adapter, Unit
from diffaccel.plan import Plan
from diffaccel.runtime.state import BranchState, Stats


class Host(Protocol):
    """What a feature may use of the executor that runs it (features do not import the executor)."""

    model: torch.nn.Module
    adapter: Adapter
    units: list[Unit]
    stats: Stats

    @property
    def current_step(self) -> int | None: ...

    def timesteps(self) -> list[float] | None: ...

    def patch(self, obj: Any, name: str, replacement: Any) -> None: ...

    def run_forward(self, original: Callable, args: tuple, kwargs: dict, state: BranchState, shape: tuple) -> Any: ...


class Feature:
    """Hooks default to doing nothing; ``applies(plan)`` says whether a plan needs the feature."""

    edits_served_values = False  # True: reused units must be served one by one, not summed in runs
    needs_scheduler = False  # True: acts on the latents between steps, so needs the pipeline's scheduler

    def __init__(self, plan: Plan, executor: Host) -> None:
        self.plan = plan
        self.executor = executor

    @classmethod
    def applies(cls, plan: Plan) -> bool:
        raise NotImplementedError

    @classmethod
    def part(cls, plan: Plan) -> Any:
        """The plan data the feature is built from (a feature whose part is unchanged survives a resample)."""
        raise NotImplementedError

    # -- lifetime ------------------------------------------------------------------------------
    def install(self) -> None:
        """The plan is being applied (before the model's forwards are wrapped)."""

    def remove(self) -> None:
        """The plan is being removed: undo what ``install`` did (idempotent)."""

    def swapped(self) -> dict[int, torch.nn.Module]:
        """Modules ``install`` put in place of others, by the ``id`` of the one replaced: a unit that
        is itself a replaced layer is wrapped in its stand-in (quantization swaps layers)."""
        return {}

    def start_run(self) -> None:
        """A pipeline call starts (its per-run state is forgotten)."""

    # -- per forward and unit --------------------------------------------------------------------
    def forward(self, original: Callable, bound: inspect.BoundArguments, state: BranchState) -> Any:
        """Produce the model's output for this call instead of running it, or None to run it."""
        return None

    def before_forward(self, state: BranchState) -> None:
        """A tracked model forward of this branch starts."""

    def action(self, state: BranchState, index: int, planned: str) -> str:
        """The action of unit ``index`` at this step (the plan's, unless the feature decides)."""
        return planned

    def before_unit(self, state: BranchState, index: int, unit: Unit, args: tuple, kwargs: dict) -> None:
        """Unit ``index`` is about to run or be served."""

    def after_compute(self, state: BranchState, index: int, output: Any) -> None:
        """Unit ``index`` was computed and cached."""

    def serve(self, value: Any, step: int, index: int) -> Any:
        """The cached value of unit ``index`` as served at ``step`` (features that correct it)."""
        return value

    # -- between steps (needs_scheduler) ---------------------------------------------------------
    def after_step(self, step: int, sample: torch.Tensor, prev: torch.Tensor) -> None:
        """The scheduler finished ``step``: ``prev`` is the new latent (may be edited in place)."""


def model_sample(out: Any) -> torch.Tensor:
    """The denoiser's prediction in its output (a tensor, a tuple, or diffusers' output dataclass)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


def with_model_sample(out: Any, sample: torch.Tensor) -> Any:
    """An output of ``out``'s kind holding ``sample`` as the prediction."""
    if isinstance(out, torch.Tensor):
        return sample
    return type(out)(sample=sample) if hasattr(out, "sample") else (sample, *out[1:])


def batch_mapped(value: Any, batch: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor of the batch's size, in dicts, lists and tuples too
    (SDXL's ``added_cond_kwargs`` holds its text embeddings and time ids in a dict)."""
    if isinstance(value, torch.Tensor):
        return fn(value) if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: batch_mapped(v, batch, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(batch_mapped(v, batch, fn) for v in value)
    return value


def same_inputs(a: Any, b: Any) -> bool:
    """Whether two model arguments hold the same values (tensors compared by shape and value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_inputs(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_inputs(x, y) for x, y in zip(a, b))
    try:
        return a is b or bool(a == b)
    except (TypeError, ValueError):  # an array's == compares elementwise
        return False


def overrides(feature: Feature, hook: str) -> bool:
    """Whether ``feature`` implements ``hook`` (the executor calls only features that do)."""
    return getattr(type(feature), hook) is not getattr(Feature, hook)

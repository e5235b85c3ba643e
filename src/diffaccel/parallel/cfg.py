"""CFG parallelism: the denoiser's batch split over ranks, the output gathered back.

Pipelines batch classifier-free guidance as ``[unconditional, conditional]``; with two ranks each
runs half the rows of every denoiser call, then one gather per call reassembles the full output and
each rank combines the guidance itself, as the pipeline always does. Every rank therefore holds the
same latents at every step.

It is done with a forward pre-hook (slice every batched input to this rank's rows) and a forward
hook (gather the output) on the denoiser, not by replacing ``forward``: hooks run outside
``forward``, so an executor applying a plan (which wraps ``forward`` and its units) sees a
consistent half-batch trajectory on each rank, whichever was installed first, and its cached unit
outputs are this rank's rows only.

Each rank takes a share of *both* halves (with two ranks, rank 0 rows 0-17 and 36-53 of a batch of
72, rank 1 the rest), not one half each: the conditional rows can cost more than the unconditional
ones (on the embedded U-Net they run about 20% slower on a CPU, through denormal numbers), and with
one half each the faster rank would wait at every gather. A batch too small to cut both halves
(fewer than ``world`` rows each) is cut into contiguous pieces instead.

Splitting a batch is exact when the model treats the rows of a batch independently (every
diffusers denoiser does); on a CPU the results are bitwise those of the single-process run when the
kernels reduce each row alike whatever the batch size (tests/test_parallel.py checks it). Any
batch of at least ``world`` rows splits, so without guidance the images of a call are spread
instead; a call of one row cannot be split (true-CFG pipelines such as Flux run their branches as
separate calls of the same batch: use batch parallelism over calls there).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from diffaccel.adapters import find_denoiser
from diffaccel.errors import warn
from diffaccel.parallel.agree import agreed_and_installed, applied_plan
from diffaccel.parallel.errors import ParallelError
from diffaccel.parallel.exchange import bounds, split_sizes, start_gather
from diffaccel.parallel.group import Group, current

SAMPLE_ARGS = ("hidden_states", "sample", "x")


# inputs without a batch dimension whose first one may equal the batch by chance: Flux's (and its
# kin's) position ids of the text and image tokens, shared by every row. Named exactly: SDXL's
# ``time_ids`` (in ``added_cond_kwargs``) has one row per sample and must be split.
BATCHLESS = ("txt_ids", "img_ids")
RULE_WARNING = ("a runtime-rule plan (first-block / dual-block caching) decides on each rank's part of the batch "
                "under CFG parallelism (each guidance branch on its own residual): the images differ from the "
                "single-process run's")


Ranges = list[tuple[int, int]]


def layout(batch: int, world: int) -> list[Ranges]:
    """The row ranges ``[start, stop)`` of each rank: a share of each half of the batch, or (a half
    of fewer than ``world`` rows) a contiguous piece each."""
    half = batch // 2
    if batch % 2 or half < world:
        return [[piece] for piece in bounds(split_sizes(batch, world))]
    return [[first, (second[0] + half, second[1] + half)]
            for first, second in zip(bounds(split_sizes(half, world)), bounds(split_sizes(half, world)))]


def _take(tensor: torch.Tensor, ranges: Ranges) -> torch.Tensor:
    return tensor[ranges[0][0]:ranges[0][1]] if len(ranges) == 1 else torch.cat([tensor[a:b] for a, b in ranges])


def slice_rows(value: Any, batch: int, ranges: Ranges, key: str | None = None) -> Any:
    """``value`` with every tensor whose first dimension is the batch cut to the rows of ``ranges``."""
    if isinstance(value, torch.Tensor):
        return _take(value, ranges) if value.dim() and value.shape[0] == batch and key not in BATCHLESS else value
    if isinstance(value, dict):
        return type(value)({k: slice_rows(v, batch, ranges, k) for k, v in value.items()})
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(slice_rows(v, batch, ranges, key) for v in value)
    return value


def reassemble(pieces: list[torch.Tensor], ranks: list[Ranges]) -> torch.Tensor:
    """The batch in its original row order from every rank's piece (its ranges' rows, in order)."""
    parts = []
    for piece, ranges in zip(pieces, ranks):
        offset = 0
        for start, stop in ranges:
            parts.append((start, piece[offset:offset + stop - start]))
            offset += stop - start
    return torch.cat([part for _, part in sorted(parts, key=lambda p: p[0])])


def gather_rows(value: Any, ranks: list[Ranges], group: Group) -> Any:
    """``value`` with every tensor of this rank's row count replaced by the whole batch."""
    sizes = [sum(b - a for a, b in ranges) for ranges in ranks]
    if isinstance(value, torch.Tensor):
        if not (value.dim() and value.shape[0] == sizes[group.rank]):
            return value
        return reassemble(start_gather(value, sizes, 0, group, async_op=False).wait(), ranks)
    if isinstance(value, dict):  # diffusers' output classes are ordered dicts (and dataclasses)
        return type(value)(**{k: gather_rows(v, ranks, group) for k, v in value.items()})
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(gather_rows(v, ranks, group) for v in value)
    return value


class CFGParallel:
    """Installs the split/gather hooks on ``model`` for ``group``; a context manager, removable."""

    def __init__(self, model: torch.nn.Module, group: Group | None = None):
        self.model = model
        self.group = group or current()
        self._handles: list[Any] = []
        self._layouts: list[list[Ranges]] = []  # per call in flight (a stack: a hooked call inside another)
        self._plan_seen = False  # whether a plan's executor was looked at (its rule warned about) yet

    def install(self) -> CFGParallel:
        if self.group.world > 1 and not self._handles:
            self._look_at_plan()
            self._handles = [self.model.register_forward_pre_hook(self._split, with_kwargs=True),
                             self.model.register_forward_hook(self._gather)]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._layouts, self._plan_seen = [], [], False

    def _look_at_plan(self) -> None:
        """Warn once that a runtime-rule plan's images will differ, whether the plan was applied
        before the split (seen at install) or after it (seen at the first denoiser call)."""
        if self._plan_seen:
            return
        plan = applied_plan(self.model)
        if plan is not None:
            self._plan_seen = True
            if plan.rule is not None:
                warn(RULE_WARNING)

    def __enter__(self) -> CFGParallel:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _batch(self, args: tuple, kwargs: dict) -> int:
        sample = next((kwargs[k] for k in SAMPLE_ARGS if k in kwargs), args[0] if args else None)
        if not isinstance(sample, torch.Tensor) or sample.dim() == 0:
            raise ParallelError(f"CFG parallelism cannot find the batched sample among the inputs of "
                                f"{type(self.model).__name__} (looked for {', '.join(SAMPLE_ARGS)} or the first "
                                "positional argument)")
        return sample.shape[0]

    def _split(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._look_at_plan()
        batch = self._batch(args, kwargs)
        if batch < self.group.world:
            raise ParallelError(f"a denoiser call of {batch} row(s) cannot be split over {self.group.world} ranks: "
                                "CFG parallelism needs a batch of at least one row per rank (guidance on, or "
                                "several images per call); for calls of one image use --parallel batch")
        ranks = layout(batch, self.group.world)
        mine = ranks[self.group.rank]
        self._layouts.append(ranks)
        return slice_rows(args, batch, mine), slice_rows(kwargs, batch, mine)

    def _gather(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if not self._layouts:  # the pre-hook raised: nothing was split
            return output
        return gather_rows(output, self._layouts.pop(), self.group)


@contextmanager
def cfg_parallel(pipe: Any, group: Group | None = None, denoiser: str | None = None) -> Iterator[CFGParallel]:
    """Split ``pipe``'s denoiser calls over the ranks of ``group`` (default: the initialised one)
    inside the ``with`` block; composable with ``diffaccel.accelerate`` in either order (a runtime-rule
    plan warns: its images differ). Every rank must hold the same weights, scheduler and other models
    (and plan, when one is applied already): checked on entry."""
    model, _ = find_denoiser(pipe, denoiser)
    wrapper = CFGParallel(model, group)
    with agreed_and_installed(wrapper, model, pipe):
        yield wrapper

"""CFG parallelism: the denoiser's batch split over ranks, the output gathered back.

Pipelines batch classifier-free guidance as ``[unconditional, conditional]``; with two ranks, rank 0
runs the unconditional half and rank 1 the conditional half of every denoiser call, then one
``all_gather`` per call reassembles the full output and each rank combines the guidance itself, as
the pipeline always does. Every rank therefore holds the same latents at every step.

It is done with a forward pre-hook (slice every batched input to this rank's rows) and a forward
hook (gather the output) on the denoiser, not by replacing ``forward``: hooks run outside
``forward``, so an executor applying a plan (which wraps ``forward`` and its units) sees a
consistent half-batch trajectory on each rank, whichever was installed first, and its cached unit
outputs are this rank's rows only.

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
from diffaccel.parallel.agree import agreed_and_installed
from diffaccel.parallel.errors import ParallelError
from diffaccel.parallel.exchange import bounds, gather_cat, split_sizes
from diffaccel.parallel.group import Group, current

SAMPLE_ARGS = ("hidden_states", "sample", "x")


def _batchless(key: str | None) -> bool:
    """Inputs without a batch dimension that could be mistaken for one (Flux's position ids)."""
    return key is not None and key.endswith("_ids")


def slice_rows(value: Any, batch: int, start: int, stop: int, key: str | None = None) -> Any:
    """``value`` with every tensor whose first dimension is the batch cut to rows [start, stop)."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() and value.shape[0] == batch and not _batchless(key) else value
    if isinstance(value, dict):
        return type(value)({k: slice_rows(v, batch, start, stop, k) for k, v in value.items()})
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(slice_rows(v, batch, start, stop, key) for v in value)
    return value


def gather_rows(value: Any, rows: int, sizes: list[int], group: Group) -> Any:
    """``value`` with every tensor of ``rows`` rows replaced by the rows of all ranks, in rank order."""
    if isinstance(value, torch.Tensor):
        return gather_cat(value, sizes, 0, group) if value.dim() and value.shape[0] == rows else value
    if isinstance(value, dict):  # diffusers' output classes are ordered dicts (and dataclasses)
        return type(value)(**{k: gather_rows(v, rows, sizes, group) for k, v in value.items()})
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(gather_rows(v, rows, sizes, group) for v in value)
    return value


class CFGParallel:
    """Installs the split/gather hooks on ``model`` for ``group``; a context manager, removable."""

    def __init__(self, model: torch.nn.Module, group: Group | None = None):
        self.model = model
        self.group = group or current()
        self._handles: list[Any] = []
        self._sizes: list[list[int]] = []  # per call in flight (a stack: a hooked call inside another)

    def install(self) -> CFGParallel:
        if self.group.world > 1 and not self._handles:
            self._handles = [self.model.register_forward_pre_hook(self._split, with_kwargs=True),
                             self.model.register_forward_hook(self._gather)]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._sizes = [], []

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
        batch = self._batch(args, kwargs)
        sizes = split_sizes(batch, self.group.world)
        if min(sizes) == 0:
            raise ParallelError(f"a denoiser call of {batch} row(s) cannot be split over {self.group.world} ranks: "
                                "CFG parallelism needs a batch of at least one row per rank (guidance on, or "
                                "several images per call); for calls of one image use --parallel batch")
        start, stop = bounds(sizes)[self.group.rank]
        self._sizes.append(sizes)
        return slice_rows(args, batch, start, stop), slice_rows(kwargs, batch, start, stop)

    def _gather(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if not self._sizes:  # the pre-hook raised: nothing was split
            return output
        sizes = self._sizes.pop()
        return gather_rows(output, sizes[self.group.rank], sizes, self.group)


@contextmanager
def cfg_parallel(pipe: Any, group: Group | None = None, denoiser: str | None = None) -> Iterator[CFGParallel]:
    """Split ``pipe``'s denoiser calls over the ranks of ``group`` (default: the initialised one)
    inside the ``with`` block; composable with ``diffaccel.accelerate`` in either order. Every rank
    must hold the same weights (and plan, when one is applied already): checked on entry."""
    model, _ = find_denoiser(pipe, denoiser)
    wrapper = CFGParallel(model, group)
    with agreed_and_installed(wrapper, model):
        yield wrapper

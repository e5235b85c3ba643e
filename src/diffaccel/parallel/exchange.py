"""Collectives the parallel modes share: gathering pieces of uneven size along one dimension, now or
in the background (the stale exchanges of patch parallelism), and gathering Python objects.

``all_gather`` needs equal shapes on every rank, so a piece shorter than the longest is padded and
trimmed again after the exchange; every rank knows every piece's size (the split is a function of
the world size), so no sizes travel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from diffaccel.parallel.group import Group
from diffaccel.parallel.shm import exchange_for


def split_sizes(total: int, world: int) -> list[int]:
    """Sizes of ``world`` contiguous pieces of ``total`` items, as equal as possible (first ones longer)."""
    base, extra = divmod(total, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def bounds(sizes: list[int]) -> list[tuple[int, int]]:
    """``[start, stop)`` of each piece."""
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def _padded(piece: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    missing = size - piece.shape[dim]
    if missing == 0:
        return piece.contiguous()
    shape = list(piece.shape)
    shape[dim] = missing
    return torch.cat([piece, piece.new_zeros(shape)], dim=dim).contiguous()


class Pending:
    """A gather in flight: ``wait()`` returns every rank's piece (trimmed to its size), in rank order."""

    def __init__(self, buffers: list[torch.Tensor], sizes: list[int], dim: int, work: Any = None):
        self.buffers, self.sizes, self.dim, self.work = buffers, sizes, dim, work

    def wait(self) -> list[torch.Tensor]:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return [b.narrow(self.dim, 0, s) for b, s in zip(self.buffers, self.sizes)]


def start_gather(piece: torch.Tensor, sizes: list[int], dim: int, group: Group, async_op: bool = True) -> Pending:
    """Gather every rank's ``piece`` (rank r's has ``sizes[r]`` along ``dim``); with ``async_op`` it
    runs while this rank computes, and ``Pending.wait`` collects it. A synchronous gather goes through
    shared memory when the ranks share a host (``shm.py``)."""
    if group.world == 1:
        return Pending([piece], sizes, dim)
    top = max(sizes)
    local = _padded(piece, dim, top)
    shared = None if async_op else exchange_for(group, local.numel() * local.element_size())
    if shared is not None:
        return Pending(shared.gather(local), sizes, dim)
    buffers = [torch.empty_like(local) for _ in range(group.world)]
    work = dist.all_gather(buffers, local, async_op=async_op)
    return Pending(buffers, sizes, dim, work if async_op else None)


def gather_cat(piece: torch.Tensor, sizes: list[int], dim: int, group: Group) -> torch.Tensor:
    """Every rank's piece, concatenated along ``dim`` in rank order (synchronous)."""
    if group.world == 1:
        return piece
    return torch.cat(start_gather(piece, sizes, dim, group, async_op=False).wait(), dim=dim)


def gather_objects(obj: Any, group: Group) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if group.world == 1:
        return [obj]
    out: list[Any] = [None] * group.world
    dist.all_gather_object(out, obj)
    return out


def sum_ints(values: list[int], group: Group) -> list[int]:
    """Element-wise sums of integer counters over the ranks (exact: 64-bit integers)."""
    if group.world == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=group.device)
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]

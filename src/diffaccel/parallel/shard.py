"""Batch parallelism: a job's images spread over ranks, and brought back together on rank 0.

Each call of the job (up to ``--batch-size`` images, one noise seed per image) is cut into contiguous
row pieces, one per rank; a call of fewer images than ranks goes whole to one rank, in turn. Rank 0
puts the pieces back in call order. Every image keeps its own seed, so it is the image the
single-process run makes; with kernels that reduce each row alike whatever the batch size (as on
this project's CPUs), bitwise so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffaccel.calibration.workload import Call
from diffaccel.parallel.exchange import bounds, gather_objects, split_sizes
from diffaccel.parallel.group import Group


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of call ``index``, as a call of their own."""

    index: int
    start: int
    stop: int
    call: Call


def _per_image(value: Any, n: int) -> bool:
    return isinstance(value, (list, tuple, torch.Tensor)) and not isinstance(value, str) and len(value) == n


def cut(call: Call, start: int, stop: int) -> Call:
    """Rows ``[start, stop)`` of a call: its seeds and every per-image argument (a list, tuple or
    tensor with one entry per seed) cut alike; other arguments are kept."""
    n = len(call.seeds)
    if (start, stop) == (0, n):
        return call
    kwargs = {k: (v[start:stop] if _per_image(v, n) else v) for k, v in call.kwargs.items()}
    return Call(kwargs, call.seeds[start:stop])


def shard(calls: list[Call], group: Group) -> list[Piece]:
    """This rank's pieces of ``calls`` (a deterministic function of the calls and the world size)."""
    mine: list[Piece] = []
    turn = 0
    for index, call in enumerate(calls):
        ranges = [(s, e) for s, e in bounds(split_sizes(len(call.seeds), group.world)) if e > s]
        for j, (start, stop) in enumerate(ranges):
            if (turn + j) % group.world == group.rank:
                mine.append(Piece(index, start, stop, cut(call, start, stop)))
        turn = (turn + len(ranges)) % group.world
    return mine


def assemble(pieces: list[Piece], images: list[torch.Tensor], group: Group, n_calls: int) -> list[torch.Tensor] | None:
    """Rank 0: the images of every call in call order, put together from every rank's pieces
    (``images[i]`` belongs to ``pieces[i]``); other ranks: None."""
    everyone = gather_objects([(p.index, p.start, x) for p, x in zip(pieces, images)], group)
    if not group.main:
        return None
    parts: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for index, start, x in (item for rank in everyone for item in rank):
        parts.setdefault(index, []).append((start, x))
    return [torch.cat([x for _, x in sorted(parts[i], key=lambda item: item[0])]) for i in range(n_calls)]


def gather_times(pieces: list[Piece], times: list[float], group: Group) -> list[float]:
    """Every rank's per-piece timings, in call order (for interleaved wall-clock pairs)."""
    everyone = gather_objects([(p.index, p.start, t) for p, t in zip(pieces, times)], group)
    return [t for _, _, t in sorted(item for rank in everyone for item in rank)]

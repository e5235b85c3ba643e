"""The process group: who this process is (rank, world size), how it reaches the others, and
rank-tagged log lines.

One code path for CPUs and GPUs: gloo when there is no GPU, NCCL when each rank has one
(``DIFFACCEL_DIST_BACKEND`` overrides). Launchers (``torchrun``, ``torch.multiprocessing.spawn``
through ``spawn`` below) describe the group in the environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``); without them this process is a group of one and every parallel
mode degrades to the single-process run. Collectives time out (``DIFFACCEL_DIST_TIMEOUT``, seconds)
so a rank that died leaves the others with an error rather than a hang.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchmetrics.metric

from diffaccel.parallel.errors import ParallelError

DEFAULT_TIMEOUT_S = 300
ON_CLOSE: list[Callable[[], None]] = []  # forget per-group state (shared segments) when the group goes


@dataclass(frozen=True)
class Group:
    """This process's place in the group; ``device`` is where its collectives' tensors live."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        return f"[rank {self.rank}/{self.world}]"


def backend() -> str:
    """NCCL when this process has a GPU (and NCCL is built in), else gloo."""
    chosen = os.environ.get("DIFFACCEL_DIST_BACKEND")
    if chosen:
        return chosen
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def current() -> Group:
    """The group of this process as it stands (a group of one when none was initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Group()
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return Group(dist.get_rank(), dist.get_world_size(), device)


def init(timeout_s: float | None = None) -> Group:
    """Join the group the launcher described in the environment (``torchrun`` sets it); a process
    started alone is a group of one. Safe to call twice."""
    if dist.is_available() and dist.is_initialized():
        return current()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    if not dist.is_available():
        raise ParallelError("this torch build has no torch.distributed; parallel runs need it")
    name = backend()
    if name == "nccl":
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        if local >= torch.cuda.device_count():
            raise ParallelError(f"rank {local} has no GPU of its own ({torch.cuda.device_count()} visible): "
                                "start at most one process per GPU")
        torch.cuda.set_device(local)
    seconds = timeout_s or float(os.environ.get("DIFFACCEL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(name, timeout=timedelta(seconds=seconds))
    return current()


def close() -> None:
    """Leave the group (a no-op for a group of one)."""
    if dist.is_available() and dist.is_initialized():
        for forget in ON_CLOSE:
            forget()
        dist.destroy_process_group()


@contextmanager
def alone() -> Iterator[None]:
    """Metrics computed on one rank only (rank 0 scoring the gathered images): torchmetrics metrics
    made inside sync their states over the default group whenever one exists, which would wait for
    ranks that are not scoring. Inside this block they do not."""
    saved = torchmetrics.metric.jit_distributed_available
    torchmetrics.metric.jit_distributed_available = lambda: False
    try:
        yield
    finally:
        torchmetrics.metric.jit_distributed_available = saved


class _RankTag(logging.Filter):
    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_rank_tagged", False):
            record.msg = f"{self.tag} {record.msg}"
            record._rank_tagged = True
        return True


def tag_logging(group: Group) -> None:
    """Prefix every log line of this process with its rank, so interleaved output stays readable."""
    if group.world <= 1:
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RankTag) for f in handler.filters):
            handler.addFilter(_RankTag(group.tag))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as torchrun does: one thread per rank unless asked otherwise
    init()
    try:
        fn(rank, *args)
    finally:
        close()


def spawn(fn: Callable[..., Any], nprocs: int = 2, args: tuple = ()) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` new processes that form one group (from Python, without
    torchrun). ``fn`` must be importable (defined at a module's top level)."""
    mp.spawn(_entry, args=(nprocs, free_port(), fn, args), nprocs=nprocs, join=True)

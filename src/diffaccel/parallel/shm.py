"""Same-host gathers through shared memory: the synchronous exchanges of CPU ranks without TCP.

gloo moves every piece through a loopback socket and wakes its I/O threads on both sides: on a
2-core machine one gather of a CFG half-batch costs 0.5-6 ms, most of it scheduling, once per
denoiser call. When every rank can map the same file, each rank instead writes its piece into its
own slot of a shared segment, publishes a sequence number, and reads the others' slots once their
numbers have caught up (about 0.1 ms). The bytes are copied, so results are bitwise those of gloo.

Slots are double-buffered by the parity of the sequence number: a rank can only be one exchange
ahead of the slowest one, because it waits for every rank's number before returning, so the slot it
overwrites was read by everyone. The segment is a file in ``/dev/shm`` (its pages reserved when
made, so a full ``/dev/shm`` means gloo rather than a crash; unlinked as soon as every rank has
mapped it); it grows, collectively, when a piece does not fit (every rank asks for the same size at
the same call, so they agree without talking). Used only on CPU groups of x86-64 machines, whose
stores become visible in program order (the data before the number that announces it); set
``DIFFACCEL_DIST_SHM=0`` to keep gloo for everything.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from diffaccel.parallel.errors import ParallelError
from diffaccel.parallel.group import DEFAULT_TIMEOUT_S, ON_CLOSE, Group

MIN_BYTES = 1 << 20
SPIN_S = 1e-3  # yield-spin this long before sleeping between polls (a long wait burns no core)
_exchanges: dict[int, SharedExchange | None] = {}  # by world size, for the group of this process
ON_CLOSE.append(_exchanges.clear)


def usable(group: Group) -> bool:
    """Whether this group may use shared memory at all (every rank decides alike)."""
    return (group.world > 1 and group.device.type == "cpu" and os.environ.get("DIFFACCEL_DIST_SHM", "1") != "0"
            and platform.machine().lower() in ("x86_64", "amd64"))


class SharedExchange:
    """One mapped segment: ``world`` ranks x 2 slots of ``nbytes``, then one sequence number per rank."""

    def __init__(self, group: Group, path: str, nbytes: int):
        self.group, self.nbytes, self.count = group, nbytes, 0
        total = group.world * 2 * nbytes + 8 * group.world
        whole = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage.from_file(path, True, total))
        self.slots = whole[: group.world * 2 * nbytes].view(group.world, 2, nbytes)
        self.numbers = whole[group.world * 2 * nbytes:].view(torch.int64)
        self.timeout_s = float(os.environ.get("DIFFACCEL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))

    def gather(self, piece: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``piece`` (same shape and dtype on every rank), in rank order."""
        self.count += 1
        slot = self.count % 2
        data = piece.contiguous().view(-1).view(torch.uint8)
        self.slots[self.group.rank, slot, : data.numel()].copy_(data)
        self.numbers[self.group.rank] = self.count
        out = []
        for rank in range(self.group.world):
            if rank == self.group.rank:
                out.append(piece.clone())  # as gloo: every piece is a buffer of its own
                continue
            self._wait_for(rank)
            out.append(self.slots[rank, slot, : data.numel()].clone().view(piece.dtype).view(piece.shape))
        return out

    def _wait_for(self, rank: int) -> None:
        start = time.perf_counter()
        while int(self.numbers[rank]) < self.count:
            waited = time.perf_counter() - start
            if waited > self.timeout_s:
                raise ParallelError(f"rank {rank} did not reach exchange {self.count} within {self.timeout_s:.0f} s "
                                    "(DIFFACCEL_DIST_TIMEOUT): it died or hangs")
            if waited < SPIN_S:
                os.sched_yield()
            else:
                time.sleep(50e-6)


def _create(group: Group, nbytes: int) -> SharedExchange | None:
    """Map a new segment on every rank (a collective), or None on every rank if any rank cannot."""
    path: list[str | None] = [None]
    if group.main:
        folder = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()
        handle, name = tempfile.mkstemp(prefix="diffaccel-exchange-", dir=folder)
        try:  # reserve the pages now: a full /dev/shm (a container's 64 MB) fails here, not later with SIGBUS
            os.posix_fallocate(handle, 0, group.world * 2 * nbytes + 8 * group.world)
            path = [name]
        except OSError:
            os.unlink(name)
        finally:
            os.close(handle)
    dist.broadcast_object_list(path, src=0)
    if path[0] is None:  # no room: every rank stays on gloo
        return None
    try:
        exchange: SharedExchange | None = SharedExchange(group, path[0], nbytes)
    except (OSError, RuntimeError):  # another host (the file is not there), or no room
        exchange = None
    mapped = torch.tensor([exchange is not None], dtype=torch.int64)
    dist.all_reduce(mapped, op=dist.ReduceOp.MIN)
    dist.barrier()  # everyone has tried: the name can go
    if group.main:
        os.unlink(path[0])
    return exchange if bool(mapped) else None


def exchange_for(group: Group, nbytes: int) -> SharedExchange | None:
    """The group's shared segment, grown to hold ``nbytes`` per slot; None when gloo must do (every
    rank gets the same answer: all call this at the same point with the same size)."""
    if not usable(group):
        return None
    key = group.world
    exchange = _exchanges.get(key, False)
    if exchange is None:
        return None
    if exchange is False or exchange.nbytes < nbytes:
        size = max(MIN_BYTES, 1 << (nbytes - 1).bit_length())
        exchange = _exchanges[key] = _create(group, size)
    return exchange

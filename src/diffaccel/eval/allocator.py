"""Steady CPU timings: keep freed memory in the process instead of page-faulting it back in every step.

glibc's malloc serves blocks above a self-adjusting threshold with fresh ``mmap`` pages and gives freed
memory at the top of its heap back to the kernel. A denoiser's activations are such blocks, so on CPU a
run can spend a fifth of its time in the kernel zeroing new pages, or none at all, depending on what ran
before it in the process (measured on the embedded DiT, batch 24, one thread: 77 ms per forward with
6,000 minor faults each, 56-65 ms without). That noise is as large as the gap between two fast plans, and
it falls unevenly on baseline and candidate. ``keep_freed_memory`` switches both mechanisms off for the
process (diffaccel's commands do it at start; ``DIFFACCEL_ALLOCATOR=system`` keeps glibc's defaults): a
serving process's steady state, where no run faults in what the one before it freed. Timed runs then
keep it; ``release_freed_memory`` hands it back before a run whose peak resident memory is measured, so
that the peak is that run's own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
ENV = "DIFFACCEL_ALLOCATOR"
_kept: list[bool] = []  # set once keep_freed_memory took effect


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl and macOS do not)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Make this process's allocator keep what it frees (no mmap for big blocks, no trimming of the heap).
    Returns whether it did: False off glibc or when ``DIFFACCEL_ALLOCATOR=system``."""
    libc = _glibc()
    if libc is None or os.environ.get(ENV, "").lower() == "system":
        return False
    if bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)):
        _kept[:] = [True]
    return bool(_kept)


def release_freed_memory() -> None:
    """Give the memory the allocator keeps back to the kernel (before measuring a run's peak memory; a
    no-op off glibc)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def allocator_state() -> str:
    """What timings in this process ran under: ``kept`` (freed memory kept) or ``system``."""
    return "kept" if _kept else "system"

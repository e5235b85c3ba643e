"""The allocator setting behind diffaccel's CPU timings: freed memory is kept and reused without page
faults, and handed back to the kernel between timed runs."""

import resource

import pytest
import torch

from diffaccel.eval import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="glibc's malloc only")


def _faults_of_a_big_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold (32 MiB), mmapped by default
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_kept_memory_is_reused_without_page_faults_until_released():
    assert allocator.keep_freed_memory()
    assert allocator.allocator_state() == "kept"
    # the heap grows until the block fits in what was freed (a few rounds in a fragmented heap); by
    # default every round maps 64 MiB of fresh pages afresh: 16,384 faults each
    rounds = [_faults_of_a_big_tensor() for _ in range(12)]
    assert sum(rounds[-4:]) < 400, rounds
    allocator.release_freed_memory()
    assert _faults_of_a_big_tensor() > 8000  # given back: the pages fault in again


def test_the_system_setting_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "system")
    assert not allocator.keep_freed_memory()

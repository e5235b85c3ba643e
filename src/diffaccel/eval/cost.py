"""Cost accounting: multiply-accumulates counted by torch's own FLOP counter."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_macs(fn: Callable[[], object]) -> int:
    """MACs executed by ``fn()`` (torch counts FLOPs = 2 x MACs for matmuls and convolutions)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2

"""Wall-clock speedups from interleaved runs (baseline, candidate, baseline, ...) in one process."""

from __future__ import annotations

import numpy as np


def wall_ratio(base_times: list[float], fast_times: list[float]) -> float:
    """Baseline time over accelerated time: the median of the per-batch ratios of interleaved
    pairs when there are at least three full-size pairs, else the ratio of the totals."""
    pairs = list(zip(base_times, fast_times))
    if len(pairs) >= 4:
        pairs = pairs[:-1]  # the last batch may be smaller; keep equal-sized pairs
    if len(pairs) >= 3:
        return float(np.median([b / f for b, f in pairs]))
    return sum(base_times) / sum(fast_times)

"""Dynamic programming over recompute steps (as in DDT / CacheQuant).

Given a budget of K full steps out of T (step 0 always one of them) and a dissimilarity matrix
``D[j, i]`` (the loss of serving step i from full step j < i), choose the full steps that minimise
``sum_i D[last_full(i), i]`` over the reused steps i. With ``g[c][j]`` the least cost of steps
``0 .. j-1`` when j is the c-th full step, ``g[c][j] = min_{i<j} g[c-1][i] + seg(i, j)`` where
``seg(i, j) = sum_{i<m<j} D[i, m]``; the answer is ``min_j g[K][j] + seg(j, T)``: O(K T^2).

With quantization (CacheQuant), a full step also carries the quantization error ``q[j]`` of the
units it computes, and every step served from it inherits that error: ``seg(i, j)`` gains
``(j - i) * q[i]``. Steps where the quantized model strays least make the better key steps.

``keysteps`` runs it once; the search's ``dp`` strategy sweeps K for each unit-set level of the
search space (``D`` from the profile for that level's units, ``set_matrix``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np


def optimal_keys(d: np.ndarray, k: int, q: np.ndarray | None = None) -> tuple[list[int], float]:
    """The ``k`` full steps (including step 0) minimising the summed dissimilarity (plus, with
    ``q``, each full step's quantization error over the steps it serves), and that sum."""
    steps = d.shape[0]
    if not 1 <= k <= steps:
        raise ValueError(f"k must lie in [1, {steps}], got {k}")
    # seg[i, j]: cost of steps i+1 .. j-1 served from full step i
    prefix = np.concatenate([np.zeros((steps, 1)), np.cumsum(d, axis=1)], axis=1)  # prefix[i, m] = sum d[i, :m]
    seg = np.full((steps, steps + 1), np.inf)
    for i in range(steps):
        for j in range(i + 1, steps + 1):
            seg[i, j] = prefix[i, j] - prefix[i, i + 1] + (0.0 if q is None else (j - i) * q[i])
    g = np.full((k + 1, steps), np.inf)
    back = np.zeros((k + 1, steps), dtype=int)
    g[1, 0] = 0.0
    for c in range(2, k + 1):
        for j in range(c - 1, steps):
            totals = g[c - 1, :j] + seg[:j, j]
            best = int(np.argmin(totals))
            g[c, j], back[c, j] = totals[best], best
    finals = g[k] + seg[:, steps]
    last = int(np.argmin(finals))
    keys = [last]
    for c in range(k, 1, -1):
        keys.append(int(back[c, keys[-1]]))
    return sorted(keys), float(finals[last])


def default_k_values(steps: int) -> list[int]:
    """Every budget of full steps from a tenth to four tenths of the steps (where the useful plans
    lie: one step more or less moves PSNR by about a dB there), and a few coarser ones above."""
    dense = range(max(1, round(steps * 0.1)), max(1, round(steps * 0.4)) + 1)
    coarse = (round(steps * f) for f in (0.5, 0.6, 0.7, 0.8, 0.88))
    return sorted({k for k in (*dense, *coarse) if 1 <= k <= max(1, steps - 1)})


def set_matrix(d: np.ndarray, units: Sequence[str], reused: Collection[str]) -> np.ndarray:
    """D[j, i]: estimated loss of reusing the ``reused`` units at step i from a full step j (the
    profile ``d[u, j, i]`` summed over those units, divided by the number of units)."""
    rows = [u for u, name in enumerate(units) if name in reused]
    return d[rows].sum(0) / len(units)


def set_errors(q: np.ndarray, units: Sequence[str], reused: Collection[str]) -> np.ndarray:
    """q[j]: quantization error (relative L1, per step) of the ``reused`` units, on ``set_matrix``'s scale."""
    rows = [u for u, name in enumerate(units) if name in reused]
    return q[rows].sum(0) / len(units)

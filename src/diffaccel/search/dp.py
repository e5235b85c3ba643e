"""The ``dp`` strategy: for each unit-set level and each budget K of full steps, the key steps
that minimise the profiled dissimilarity (``calibration.dp``); the evaluated schedules' non-dominated
set is its front."""

from __future__ import annotations

import numpy as np

from diffaccel.calibration.dp import default_k_values, optimal_keys, set_errors, set_matrix
from diffaccel.search.space import Genome, Space


def dp_candidates(space: Space, dissimilarity: np.ndarray, k_values: list[int] | None = None,
                  quant_error: np.ndarray | None = None) -> list[tuple[Genome, str]]:
    """Schedules for every level and K (fewest full steps first), labelled ``dp <level> K=<k>``;
    ``quant_error`` (units x steps) makes the DP account for quantization (see the module doc)."""
    out: list[tuple[Genome, str]] = []
    seen: set[Genome] = set()
    for k in k_values or default_k_values(space.num_steps):
        for level in space.levels[1:]:
            q = None if quant_error is None else set_errors(quant_error, space.units, level.reused)
            keys, _ = optimal_keys(set_matrix(dissimilarity, space.units, level.reused), k, q)
            genome = space.complete(["C" if step in keys else level.name for step in range(1, space.num_steps)])
            if genome not in seen:
                seen.add(genome)
                out.append((genome, f"dp {level.name} K={k}"))
    return out

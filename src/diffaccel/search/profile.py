"""Quality-loss estimates from the dissimilarity profile (shared by DP and greedy).

``d[u, j, i]`` is the relative L1 change of unit ``u``'s output from step j to step i, measured on
the full-compute calibration runs (see ``evaluate.CalibrationRun``). Reusing unit ``u`` at step i
serves its output from the last step that computed it, ``j``, and the estimate charges
``d[u, j, i]``; a schedule's estimated loss is the sum over steps and reused units, divided by
the number of units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffaccel.search.space import Space


def reuse_mask(space: Space, genome: Sequence[str]) -> np.ndarray:
    """(steps, units) booleans: is the unit reused at the step."""
    mask = np.zeros((space.num_steps, len(space.units)), dtype=bool)
    for step, level in enumerate(space.schedule(genome), start=1):
        reused = space.by_name[level].reused
        mask[step] = [u in reused for u in space.units]
    return mask


def unit_loss(d: np.ndarray, unit: int, reused: np.ndarray) -> float:
    """Estimated loss of one unit given its per-step reuse flags."""
    loss, last = 0.0, 0
    for step in range(1, len(reused)):
        if reused[step]:
            loss += d[unit, last, step]
        else:
            last = step
    return loss


def estimated_loss(d: np.ndarray, space: Space, genome: Sequence[str]) -> float:
    mask = reuse_mask(space, genome)
    return sum(unit_loss(d, u, mask[:, u]) for u in range(len(space.units))) / len(space.units)


def saving(space: Space, level: str, unit_costs: Sequence[float]) -> float:
    """Share of one step's cost that reusing ``level`` saves (``unit_costs``: [total, unit 0, ...])."""
    reused = space.by_name[level].reused
    return sum(c for name, c in zip(space.units, unit_costs[1:]) if name in reused) / unit_costs[0]

"""Greedy baseline: start from all-compute and repeatedly make the move with the least estimated
quality loss per unit of cost saved (a move raises one step to a level that saves more), using
the profile's loss estimate. The chain of schedules runs from all-compute to all-reuse; a few of
them, evenly spaced in cost, are evaluated. It shows what the profile alone buys, next to DP
(optimal for one level) and NSGA-II (measured quality, mixed levels)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffaccel.search.profile import reuse_mask, saving, unit_loss
from diffaccel.search.space import Genome, Space


def greedy_chain(space: Space, dissimilarity: np.ndarray, unit_costs: Sequence[float]) -> list[tuple[Genome, float]]:
    """Every schedule of the greedy walk with its cost fraction, all-compute first."""
    save = {level.name: saving(space, level.name, unit_costs) for level in space.levels}
    genome = list(space.all_compute())
    mask = reuse_mask(space, genome)
    losses = [unit_loss(dissimilarity, u, mask[:, u]) for u in range(len(space.units))]
    fraction = 1.0
    chain = [(tuple(genome), fraction)]
    steps = space.num_steps
    while True:
        best = None
        for step in range(1, steps):
            current = genome[step - 1]
            for level in space.levels:
                gained = save[level.name] - save[current]
                if gained <= 1e-12:
                    continue
                reused = level.reused
                new_flags = np.array([u in reused for u in space.units])
                changed = np.flatnonzero(new_flags != mask[step])
                delta = 0.0
                for u in changed:
                    flags = mask[:, u].copy()
                    flags[step] = new_flags[u]
                    delta += unit_loss(dissimilarity, u, flags) - losses[u]
                score = delta / len(space.units) / gained
                if best is None or score < best[0] - 1e-15:
                    best = (score, step, level.name, gained)
        if best is None:
            return chain
        _, step, name, gained = best
        genome[step - 1] = name
        mask = reuse_mask(space, genome)
        losses = [unit_loss(dissimilarity, u, mask[:, u]) for u in range(len(space.units))]
        fraction -= gained / steps
        chain.append((tuple(genome), fraction))


def greedy_candidates(space: Space, dissimilarity: np.ndarray, unit_costs: Sequence[float], count: int = 20
                      ) -> list[tuple[Genome, str]]:
    """``count`` schedules of the chain, evenly spaced in cost, labelled ``greedy #<move>``."""
    chain = greedy_chain(space, dissimilarity, unit_costs)[1:]
    if not chain:
        return []
    fractions = np.array([f for _, f in chain])
    targets = np.linspace(fractions.max(), fractions.min(), min(count, len(chain)))
    picked: list[int] = []
    for target in targets:
        index = int(np.argmin(np.abs(fractions - target)))
        if index not in picked:
            picked.append(index)
    return [(chain[i][0], f"greedy #{i + 1}") for i in picked]

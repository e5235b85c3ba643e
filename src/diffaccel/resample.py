"""Map a static schedule made for N denoiser evaluations onto M (the rule behind ``Plan.resample``).

Per unit, the new schedule computes the unit on the same *share* of steps as the old one (so the
MAC ratio a plan promises holds), and where the old one computed it (so a schedule dense at the
start stays dense at the start). Old step ``s`` sits at position ``s / N`` of the run and new step
``j`` covers positions ``[j / M, (j + 1) / M)``; the new step computes the unit when the old
schedule's count of compute steps before ``(j + 1) / M``, scaled by ``M / N`` and rounded, exceeds
the computes placed so far. Step 0 computes everything, as in every plan. A step that skips a unit
forecasts it if the old schedule ever forecast that unit, else reuses it. Per-step settings follow
the nearest old step of the same kind (``nearest``).

Pure functions of rows and lists: ``plan.py`` builds ``Plan.resample`` on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def compute_steps(column: str, new_steps: int) -> set[int]:
    """The new steps at which a unit with old actions ``column`` (one letter per old step) computes."""
    old = len(column)
    computed_old = [s for s, action in enumerate(column) if action == "C"]
    chosen, placed = {0}, 1
    for j in range(1, new_steps):
        end = (j + 1) * old / new_steps  # old positions covered up to the end of new step j
        wanted = math.floor(sum(1 for s in computed_old if s < end) * new_steps / old + 0.5)
        if placed < wanted:
            chosen.add(j)
            placed += 1
    return chosen


def resample_rows(schedule: Sequence[str], new_steps: int) -> list[str]:
    """Schedule rows (one letter per unit) for ``new_steps`` steps."""
    units = len(schedule[0])
    columns = ["".join(row[u] for row in schedule) for u in range(units)]
    per_unit = []
    for column in columns:
        computes = compute_steps(column, new_steps)
        skip = "F" if "F" in column else "R"
        per_unit.append(["C" if j in computes else skip for j in range(new_steps)])
    return ["".join(unit[j] for unit in per_unit) for j in range(new_steps)]


def nearest(step: int, new_steps: int, old_steps: int, among: Sequence[int]) -> int | None:
    """The old step among ``among`` closest to new step ``step`` (by position in the run)."""
    if not among:
        return None
    position = step * (old_steps - 1) / max(1, new_steps - 1)
    return min(among, key=lambda s: (abs(s - position), s))


def carry_per_step(values: Sequence, old_rows: Sequence[str], new_rows: Sequence[str], neutral: object) -> list:
    """A per-step list for the new rows: a step that reuses anything takes the value of the nearest
    old step that reused anything; an all-compute step takes ``neutral``."""
    old_reused = [s for s, row in enumerate(old_rows) if set(row) != {"C"}]
    out = []
    for j, row in enumerate(new_rows):
        source = nearest(j, len(new_rows), len(old_rows), old_reused) if set(row) != {"C"} else None
        out.append(neutral if source is None else values[source])
    return out


def carry_unit_steps(old_steps: int, new_rows: Sequence[str],
                     has: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """For every skipped (new step, unit): the nearest old step at which that unit has a per-unit
    setting (``has[u]``: the old steps that have one). Returns (new step, unit, old step) triples."""
    out = []
    for j, row in enumerate(new_rows):
        for u, action in enumerate(row):
            source = nearest(j, len(new_rows), old_steps, sorted(has[u])) if action != "C" else None
            if source is not None:
                out.append((j, u, source))
    return out

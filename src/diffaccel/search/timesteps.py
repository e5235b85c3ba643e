"""Fitted timesteps: where a sampler's few steps fall, fitted on the calibration set to the reference.

At 6-10 steps the default spacings (even in timestep, as diffusers places them) are far from the best
placement for a given model: moving the steps took the embedded DiT's 8-step UniPC from 29.1 to
32.7 dB on the calibration images and to 31.2 dB on held-out seeds, ahead of the plain 9-step run
(30.1 dB): the idea of learned step schedules such as Align Your Steps, done here by direct search.
A schedule is a handful of numbers, so the fit is derivative-free: Nelder-Mead (scipy) over the
logarithms of the gaps between consecutive timesteps, which keeps every candidate decreasing and
ending above 0, under an evaluation cap and a deadline. Each evaluation is one calibration run.

Nelder-Mead needs many runs in 10 or more dimensions: on a slow pipeline (the embedded SD, 12-14
steps, a calibration run of 10 s or more) a fit got 3 to 11 runs and gained little. So a
one-parameter family is scored first (``power_schedule``: ``first * (1 - i / steps) ** rho`` for a
few ``rho``, then halfway towards the best one's neighbours), and the fit returns the best run seen:
on 8 SD calibration calls the family took 12-step UniPC from 30.7 to 35.2 dB and 8-step UniPC from
26.7 to 31.9 dB in a handful of runs. The simplex still starts from the solver's own timesteps (or
the warm start, if better): started from the family's best, the DiT's 8-step fit ended at 31.28 dB
in 133 runs against 32.68 dB in 122 from its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from diffaccel.solvers.spec import SolverSpec

STEP_SIZE = 0.4  # the initial simplex's move of each gap's log (a gap x or / 1.5)
EVALUATIONS_PER_STEP = 20  # the fit's evaluation cap, per free timestep
FAMILY = (0.3, 0.45, 0.65, 1.0, 1.5)  # exponents of the power schedule scored before the simplex
STALL_PER_STEP = 5  # runs per free timestep without a gain of the fit's ``stall_gain`` after which it stops.
# On the embedded U-Net's 5-step EVODiff fit (4 free timesteps, 75 runs to its cap) the best was 30.77 dB at run
# 35 and 30.80 at run 67; its gains of 0.05 dB came at most 17 runs apart. On SD a 5-step fit spent 70-80 runs
# (6-7 minutes) on a value it had reached early. A stopped fit can be restarted (phase 4 of the joint search).


class _OutOfTime(Exception):
    """The fit stops: the cap, the deadline, or a run good enough."""


@dataclass
class Fit:
    spec: SolverSpec
    quality: float  # the objective's value at the fitted timesteps (higher is better)
    start_quality: float  # at the solver's own timesteps
    evaluations: int
    stalled: bool = False  # stopped for want of gain (``stall_gain``), not at its cap or deadline


def timesteps_from(log_gaps: np.ndarray, first: int) -> tuple[int, ...]:
    """Decreasing integer timesteps from ``first``: the gaps down to 0 in proportion to
    ``exp(log_gaps)`` (the last gap, to 0, has log 0), rounded."""
    gaps = np.exp(np.concatenate([np.clip(log_gaps, -6, 6), [0.0]]))
    positions = np.concatenate([[0.0], np.cumsum(gaps)[:-1]]) / gaps.sum()
    return tuple(int(round(first * (1 - p))) for p in positions)


def log_gaps_of(timesteps: tuple[int, ...]) -> np.ndarray:
    gaps = -np.diff(np.asarray([*timesteps, 0], dtype=float))
    return np.log(np.maximum(gaps[:-1], 0.5) / max(gaps[-1], 0.5))


def power_schedule(first: int, steps: int, rho: float) -> tuple[int, ...]:
    """``steps`` timesteps from ``first``: ``first * (1 - i / steps) ** rho``. ``rho`` 1 spaces them
    evenly; below 1 they crowd at high noise and the last one stays high (the final step then jumps
    to the clean sample), above 1 they crowd at low noise."""
    return tuple(int(round(first * (1 - i / steps) ** rho)) for i in range(steps))


def _score_family(loss: Callable[[np.ndarray], float], first: int, steps: int) -> None:
    """Scores the power schedules through ``loss`` (which keeps the best run seen): ``FAMILY``, then the
    exponents halfway (in log) between the best one and its neighbours."""
    scored = {rho: loss(log_gaps_of(power_schedule(first, steps, rho))) for rho in FAMILY}
    best = min(scored, key=scored.get)
    i = FAMILY.index(best)
    for neighbour in FAMILY[max(0, i - 1):i] + FAMILY[i + 1:i + 2]:
        rho = math.sqrt(best * neighbour)
        scored[rho] = loss(log_gaps_of(power_schedule(first, steps, rho)))


def resampled(timesteps: tuple[int, ...], steps: int) -> tuple[int, ...]:
    """A schedule's shape at another step count: its timesteps as a curve over the run's fraction
    (ending at 0), read at ``steps`` even fractions. A fit at one step count starts the next from it."""
    curve = np.asarray([*timesteps, 0], dtype=float)
    return tuple(int(round(v)) for v in np.interp(np.arange(steps) / steps, np.linspace(0, 1, len(curve)), curve))


def fit_timesteps(spec: SolverSpec, own: tuple[int, ...], objective: Callable[[SolverSpec], float],
                  deadline: float | None = None, evaluations: int | None = None,
                  warm: tuple[int, ...] | None = None, enough: float | None = None,
                  stall_gain: float | None = None) -> Fit:
    """The timesteps for ``spec``'s solver and step count that maximize ``objective`` (a calibration
    score): ``own`` (the solver's default timesteps), ``warm`` (e.g. an earlier fit at another step
    count, ``resampled``) and the power schedules (``_score_family``) are scored, then the simplex
    starts from ``own`` or ``warm``, whichever scored better. Stops at the evaluation cap, at
    ``deadline``, once a run reaches ``enough``, or (given ``stall_gain``) after ``STALL_PER_STEP``
    runs per free timestep of the simplex that did not raise the best by ``stall_gain`` (the starts and
    the family do not count: a good warm start must not leave the simplex no runs), returning the best seen;
    candidates that round to repeated timesteps are skipped."""
    cap = evaluations or EVALUATIONS_PER_STEP * max(1, spec.steps - 1)
    stall = STALL_PER_STEP * max(1, spec.steps - 1)
    seen: dict[tuple[int, ...], float] = {}
    best: list = [-math.inf, own]
    mark = [math.inf, math.inf]  # the best when it last rose by ``stall_gain`` in the simplex, and the run count then

    def loss(log_gaps: np.ndarray) -> float:
        timesteps = timesteps_from(log_gaps, own[0])
        if len(set(timesteps)) < len(timesteps) or timesteps[-1] < 1:
            return 1e6
        if timesteps not in seen:
            if len(seen) >= cap or (deadline is not None and time.time() >= deadline):
                raise _OutOfTime
            seen[timesteps] = objective(spec.model_copy(update={"timesteps": timesteps}))
            if seen[timesteps] > best[0]:
                best[:] = [seen[timesteps], timesteps]
            if stall_gain is not None and best[0] >= mark[0] + stall_gain:
                mark[:] = [best[0], len(seen)]
            if (enough is not None and best[0] >= enough) or \
                    (stall_gain is not None and len(seen) - mark[1] >= stall):
                raise _OutOfTime
        return -seen[timesteps]

    start = log_gaps_of(own)
    if len(start) == 0:  # one step: nothing to place
        return Fit(spec, objective(spec), -math.inf, 1)
    try:
        starts = [(loss(start), start)]
        if warm is not None and len(warm) == len(own) and warm[0] == own[0]:
            starts.append((loss(log_gaps_of(warm)), log_gaps_of(warm)))
        _score_family(loss, own[0], len(own))  # the best run seen is what the fit returns
        start = min(starts, key=lambda pair: pair[0])[1]
        mark[:] = [best[0], len(seen)]  # the stall window counts the simplex's runs only
        simplex = np.vstack([start, start + STEP_SIZE * np.eye(len(start))])
        minimize(loss, start, method="Nelder-Mead",
                 options={"initial_simplex": simplex, "maxfev": 4 * cap, "xatol": 1e-3, "fatol": 1e-3})
    except _OutOfTime:
        pass
    start_quality = seen.get(timesteps_from(log_gaps_of(own), own[0]), -math.inf)
    stalled = stall_gain is not None and len(seen) - mark[1] >= stall
    return Fit(spec.model_copy(update={"timesteps": best[1]}), best[0], start_quality, len(seen), stalled)


def next_fit_count(meets: dict[int, bool], plain: dict[int, float], gain: float, threshold: float,
                   ceiling: int) -> int | None:
    """The step count to fit next, given the fits so far (count -> whether it cleared ``threshold``):
    below the cheapest that cleared, the fewest whose plain run (``plain``) plus that fit's ``gain``
    over its own plain run would clear (else one fewer), never at or below a count that missed (then
    halfway between the miss and the cheapest clear: a jump that overshot costs one fit); with none
    cleared yet, one more than the last miss, below ``ceiling`` (the plain run that cleared). None
    when the counts that clear and miss meet."""
    met = min((n for n, ok in meets.items() if ok), default=None)
    missed = max((n for n, ok in meets.items() if not ok and (met is None or n < met)), default=None)
    if met is None:
        return missed + 1 if missed is not None and missed + 1 < ceiling else None
    if missed is not None:
        return (missed + met) // 2 if met - missed > 1 else None
    jump = [n for n, psnr in plain.items() if n < met - 1 and psnr + gain >= threshold]
    nxt = min(jump, default=met - 1)
    return nxt if nxt >= 3 else None

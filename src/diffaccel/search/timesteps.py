"""Fitted timesteps: where a sampler's few steps fall, fitted on the calibration set to the reference.

At 6-10 steps the default spacings (even in timestep, as diffusers places them) are far from the best
placement for a given model: moving the steps took the embedded DiT's 8-step UniPC from 29.1 to
32.7 dB on the calibration images and to 31.2 dB on held-out seeds, ahead of the plain 9-step run
(30.1 dB): the idea of learned step schedules such as Align Your Steps, done here by direct search.
A schedule is a handful of numbers, so the fit is derivative-free: Nelder-Mead (scipy) over the
logarithms of the gaps between consecutive timesteps, which keeps every candidate decreasing and
ending above 0, from the solver's own timesteps, under an evaluation cap and a deadline. Each
evaluation is one calibration run.
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


class _OutOfTime(Exception):
    pass


@dataclass
class Fit:
    spec: SolverSpec
    quality: float  # the objective's value at the fitted timesteps (higher is better)
    start_quality: float  # at the solver's own timesteps
    evaluations: int


def timesteps_from(log_gaps: np.ndarray, first: int) -> tuple[int, ...]:
    """Decreasing integer timesteps from ``first``: the gaps down to 0 in proportion to
    ``exp(log_gaps)`` (the last gap, to 0, has log 0), rounded."""
    gaps = np.exp(np.concatenate([np.clip(log_gaps, -6, 6), [0.0]]))
    positions = np.concatenate([[0.0], np.cumsum(gaps)[:-1]]) / gaps.sum()
    return tuple(int(round(first * (1 - p))) for p in positions)


def log_gaps_of(timesteps: tuple[int, ...]) -> np.ndarray:
    gaps = -np.diff(np.asarray([*timesteps, 0], dtype=float))
    return np.log(np.maximum(gaps[:-1], 0.5) / max(gaps[-1], 0.5))


def resampled(timesteps: tuple[int, ...], steps: int) -> tuple[int, ...]:
    """A schedule's shape at another step count: its timesteps as a curve over the run's fraction
    (ending at 0), read at ``steps`` even fractions. A fit at one step count starts the next from it."""
    curve = np.asarray([*timesteps, 0], dtype=float)
    return tuple(int(round(v)) for v in np.interp(np.arange(steps) / steps, np.linspace(0, 1, len(curve)), curve))


def fit_timesteps(spec: SolverSpec, own: tuple[int, ...], objective: Callable[[SolverSpec], float],
                  deadline: float | None = None, evaluations: int | None = None,
                  warm: tuple[int, ...] | None = None) -> Fit:
    """The timesteps for ``spec``'s solver and step count that maximize ``objective`` (a calibration
    score), starting from ``own`` (the solver's default timesteps) or ``warm`` (e.g. an earlier fit
    at another step count, ``resampled``), whichever scores better. Stops at the evaluation cap or at
    ``deadline``, returning the best seen; candidates that round to repeated timesteps are skipped."""
    cap = evaluations or EVALUATIONS_PER_STEP * max(1, spec.steps - 1)
    seen: dict[tuple[int, ...], float] = {}
    best: list = [-math.inf, own]

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
        return -seen[timesteps]

    start = log_gaps_of(own)
    if len(start) == 0:  # one step: nothing to place
        return Fit(spec, objective(spec), -math.inf, 1)
    try:
        own_loss = loss(start)
        if warm is not None and len(warm) == len(own) and warm[0] == own[0]:
            warm_start = log_gaps_of(warm)
            if loss(warm_start) < own_loss:
                start = warm_start
        simplex = np.vstack([start, start + STEP_SIZE * np.eye(len(start))])
        minimize(loss, start, method="Nelder-Mead",
                 options={"initial_simplex": simplex, "maxfev": 4 * cap, "xatol": 1e-3, "fatol": 1e-3})
    except _OutOfTime:
        pass
    start_quality = seen.get(timesteps_from(log_gaps_of(own), own[0]), -math.inf)
    return Fit(spec.model_copy(update={"timesteps": best[1]}), best[0], start_quality, len(seen))


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

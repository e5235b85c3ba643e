"""Fitted model timesteps: the timestep the denoiser is told at each step of a fitted sampler, moved
off the solver's own (``SolverSpec.model_timesteps``, ``solvers/model_time.py``), by coordinate
search on the calibration set.

Each told timestep is tried ``SHIFTS[0]`` higher and lower, then half that, and half again, step by
step (all steps at one size before the next, so that a fit cut short by its deadline has moved every
step coarsely); a move is kept when the objective (the calibration score) improves. A handful of
integers: no simplex is needed, and the cost is known up front (at most two runs per step and size).
On the embedded U-Net's fitted 5-step EVODiff the probe's finer search found shifts of -24 to +4 and
+0.4 to +0.8 dB on fresh seeds (``benchmarks/model_time_probe.py``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from diffaccel.search.timesteps import Fit
from diffaccel.solvers.spec import SolverSpec

SHIFTS = (16, 8, 4)  # timesteps a told timestep moves by, coarse to fine


def fit_model_timesteps(spec: SolverSpec, own: tuple[int, ...], objective: Callable[[SolverSpec], float],
                        deadline: float | None, schedule_length: int) -> Fit:
    """``spec`` with the timesteps its denoiser is told fitted from ``own`` (the solver's timesteps,
    or ``spec.model_timesteps`` when it has them) to maximize ``objective``; the best run seen when
    ``deadline`` comes first. Told timesteps stay decreasing and within the noise schedule's
    ``schedule_length`` timesteps."""
    told = list(spec.model_timesteps or own)
    if deadline is not None and time.time() >= deadline:
        return Fit(spec, -math.inf, -math.inf, 0)
    best = start = objective(spec.model_copy(update={"model_timesteps": tuple(told)}))
    runs = 1
    for shift in SHIFTS:
        for step in range(len(told)):
            for move in (-shift, shift):
                if deadline is not None and time.time() >= deadline:
                    return Fit(_told(spec, told, own), best, start, runs)
                trial = told[:step] + [told[step] + move] + told[step + 1:]
                if not _placeable(trial, schedule_length):
                    continue
                quality = objective(spec.model_copy(update={"model_timesteps": tuple(trial)}))
                runs += 1
                if quality > best:
                    best, told = quality, trial
                    break  # the other direction cannot also gain from here
    return Fit(_told(spec, told, own), best, start, runs)


def _placeable(told: list[int], schedule_length: int) -> bool:
    return all(a > b for a, b in zip(told, told[1:])) and told[-1] >= 0 and told[0] < schedule_length


def _told(spec: SolverSpec, told: list[int], own: tuple[int, ...]) -> SolverSpec:
    """``spec`` telling ``told``; without ``model_timesteps`` when they are the solver's own."""
    return spec.model_copy(update={"model_timesteps": None if tuple(told) == tuple(own) else tuple(told)})

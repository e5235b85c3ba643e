"""NSGA-II over the compact schedule encoding (``space.py``), with optuna's ``NSGAIISampler``.

Objectives: calibration quality (PSNR or SSIM, the budget's metric) up, cost (MAC or latency
fraction) down. The first trials are the hand-made plans at several settings (their schedules
mapped into the space), then the GA takes over: uniform crossover between parents chosen by rank
and crowding distance, and mutation (each gene redrawn with probability 1/(T-1)).

Determinism, so that a killed and resumed search reaches the same front as an uninterrupted one:
the candidate of a trial is a function of the search seed and the trial's *logical clock*, the
number of trials completed before it (not the trial number, which a failed trial would shift):

* trial k < len(seeds) evaluates seed k (enqueued just before it is asked for);
* otherwise, before the trial the sampler's random states are reseeded from (seed, k), and its
  parents are the populations of completed trials, which are the same in both runs;
* a trial killed while running is failed on restart and its parameters enqueued again, so it is
  re-evaluated first, at the same clock;
* enqueued trials get their generation when they start (optuna gives generations only to trials
  it samples, which would leave the seeds out of the first population).

With several workers sharing a storage the search is still correct, but no longer reproducible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import optuna
from optuna.samplers import NSGAIISampler
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.trial import TrialState

from diffaccel.search.space import Genome
from diffaccel.search.store import Store

LOG = logging.getLogger("diffaccel")

class ClockSeededNSGAII(NSGAIISampler):
    """NSGA-II whose random draws for a trial depend only on (seed, completed trials so far)."""

    def __init__(self, seed: int, population_size: int = 16, **kwargs):
        super().__init__(seed=seed, population_size=population_size, **kwargs)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        clock = len(study._get_trials(deepcopy=False, states=[TrialState.COMPLETE], use_cache=False))
        state = np.random.SeedSequence([self._base_seed, clock]).generate_state(2)
        self._rng.rng.seed(int(state[0]))
        self._random_sampler._rng = LazyRandomState(int(state[1]))
        self.get_trial_generation(study, trial)
        super().before_trial(study, trial)


def run_nsga(store: Store, seeds: list[tuple[Genome, str]], evaluate: Callable, trials: int | None,
             deadline: float | None, log: Callable[[str], None] = LOG.info) -> int:
    """Evaluate trials until ``trials`` have completed in the study (all runs together) or the
    deadline passes; returns how many this call evaluated."""
    labels = {genome: name for genome, name in seeds}
    done = 0
    while True:
        if deadline is not None and time.time() >= deadline:
            return done
        complete = store.n_complete()
        if trials is not None and complete >= trials and not store.settle(deadline):
            return done
        if not store.has_waiting() and complete < len(seeds):
            store.study.enqueue_trial(store.space.params(seeds[complete][0]))
        trial = store.evaluate_next(evaluate, lambda g: labels.get(g, "nsga2"))
        done += 1
        log(_line(trial))


def _line(trial) -> str:
    attrs = trial.user_attrs
    return (f"trial {trial.number}: {attrs.get('source', '')} psnr {attrs.get('psnr', float('nan')):.2f} dB, "
            f"cost {trial.values[1]:.3f}" + (" (cached)" if "duplicate_of" in attrs else ""))


def run_list(store: Store, candidates: list[tuple[Genome, str]], evaluate: Callable, deadline: float | None,
             log: Callable[[str], None] = LOG.info) -> int:
    """Evaluate a fixed list of candidates (DP, greedy) in order, skipping those already stored."""
    labels = {genome: name for genome, name in candidates}
    done = 0
    while True:
        if deadline is not None and time.time() >= deadline:
            return done
        stored = store.genomes(states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
        pending = [g for g, _ in candidates if g not in stored]
        if not pending and not store.has_waiting():
            return done
        if not store.has_waiting():
            store.study.enqueue_trial(store.space.params(pending[0]))
        trial = store.evaluate_next(evaluate, lambda g: labels.get(g, "retry"))
        done += 1
        log(_line(trial))

"""The step clock: which denoising step a denoiser call belongs to, read off the scheduler.

A pipeline call starts with ``scheduler.set_timesteps`` and ends each step with ``scheduler.step``;
every denoiser call between two ``step`` calls belongs to the same step, the k-th of them to
guidance branch k. Counting this way keeps plans aligned with samplers that repeat or insert
timesteps (PNDM, Heun, KDPM2): a plan step is one denoiser evaluation of the run, and a run has
``len(scheduler.timesteps)`` of them (fewer when the pipeline sets a begin index, as img2img does).

The wrappers keep the wrapped methods' signatures (``functools.wraps``): pipelines inspect them to
decide which arguments to pass (``eta``, ``generator``, custom ``sigmas``), and every argument
reaches the scheduler unchanged.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, sample before, sample after)


def timestep_value(t: Any) -> float:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0])
    return float(t)


def prev_sample(out: Any) -> torch.Tensor:
    return out.prev_sample if hasattr(out, "prev_sample") else out[0]


class StepClock:
    """Counts steps and guidance branches of the current pipeline call."""

    def __init__(self) -> None:
        self.active = False  # a scheduler is hooked and a pipeline call has started
        self.step = 0
        self.calls = 0  # denoiser calls in the current step so far
        self.timesteps: list[float] = []
        self.begin = 0
        self.begin_told = False  # the pipeline set the begin index itself (0 included)
        self.in_doubt = False  # the first timestep seen stands twice in the schedule (PNDM's)

    @property
    def expected_steps(self) -> int:
        return len(self.timesteps) - self.begin

    def start(self, timesteps: Any) -> None:
        self.active, self.step, self.calls, self.begin, self.begin_told, self.in_doubt = True, 0, 0, 0, False, False
        self.timesteps = [timestep_value(t) for t in timesteps]

    def find_begin(self, t: float, wanted: int | None = None) -> None:
        """At a run's first forward: where an image-to-image pipeline whose scheduler keeps no begin
        index (DDIM, PNDM) starts in the schedule, read off the timestep the model sees there (not where
        the pipeline told it: AuraFlow sets 0 and passes t / 1000, which can equal a later timestep). A
        timestep PNDM evaluates twice leaves two starts: the one that leaves ``wanted`` evaluations (the
        plan's), else the first, checked at the next step (``recheck_begin``)."""
        if self.begin_told or not self.timesteps or t == self.timesteps[0] or t not in self.timesteps:
            return
        places = [i for i, x in enumerate(self.timesteps) if x == t]
        self.begin = next((i for i in places if len(self.timesteps) - i == wanted), places[0])
        self.in_doubt = len(places) > 1

    def recheck_begin(self, t: float) -> bool:
        """At the second step of a run whose start was in doubt: the timestep seen now settles it (the
        begin moves to the other place if need be); True when it was settled here."""
        if not self.in_doubt or self.step != 1 or self.calls:
            return False
        self.in_doubt = False
        ts, begin = self.timesteps, self.begin
        for other in (begin - 1, begin + 1):
            if 0 <= other < len(ts) - 1 and ts[other] == ts[begin] and ts[other + 1] == t != ts[begin + 1]:
                self.begin = other
        return True

    def next_branch(self) -> int:
        branch = self.calls
        self.calls += 1
        return branch

    def hook(self, scheduler: Any, patch: Callable[[Any, str, Any], None], guard: Any, on_run: Callable[[], None],
             on_step: StepHook | None) -> None:
        """Wrap ``scheduler``'s ``set_timesteps``, ``set_begin_index`` and ``step`` through ``patch``
        (which records the originals for restoring). ``on_step`` sees each step's latents. Each wrapper
        first asks ``guard.enter_scheduler()`` (``guard.py``): False, the plan is gone, pass the call through."""
        set_timesteps, step = scheduler.set_timesteps, scheduler.step
        step_signature = inspect.signature(step)

        @functools.wraps(set_timesteps)
        def set_timesteps_counted(*args, **kwargs):
            if not guard.enter_scheduler():
                return set_timesteps(*args, **kwargs)
            out = set_timesteps(*args, **kwargs)
            self.start(scheduler.timesteps)
            on_run()
            return out

        @functools.wraps(step)
        def step_counted(*args, **kwargs):
            if not guard.enter_scheduler():
                return step(*args, **kwargs)
            out = step(*args, **kwargs)
            if on_step is not None:
                sample = step_signature.bind(*args, **kwargs).arguments["sample"]
                on_step(self.step, sample, prev_sample(out))
            self.step += 1
            self.calls = 0
            return out

        step_counted.diffaccel_guard = guard  # a second plan on this scheduler is refused (guard.py)
        patch(scheduler, "set_timesteps", set_timesteps_counted)
        patch(scheduler, "step", step_counted)
        set_begin_index = getattr(scheduler, "set_begin_index", None)
        if callable(set_begin_index):
            @functools.wraps(set_begin_index)
            def set_begin_index_counted(*args, **kwargs):
                if not guard.enter_scheduler():
                    return set_begin_index(*args, **kwargs)
                out = set_begin_index(*args, **kwargs)
                self.begin, self.begin_told = int(getattr(scheduler, "begin_index", None) or 0), True
                return out

            patch(scheduler, "set_begin_index", set_begin_index_counted)

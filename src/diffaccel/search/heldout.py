"""The held-out check: a plan against the unaccelerated pipeline on inputs it was not chosen on,
interleaved in this process (fidelity, MAC and wall-clock speedups)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from diffaccel.adapters import find_denoiser
from diffaccel.calibration.reference import checked_images, identity_plan, run_with_plan
from diffaccel.eval.cost import count_macs
from diffaccel.eval.fidelity import fidelity
from diffaccel.eval.timing import wall_ratio
from diffaccel.plan import Plan


def compare(pipe: Any, fn: Callable, plan: Plan, pairs: int = 3) -> dict:
    """Run ``fn`` without and with ``plan``, interleaved ``pairs`` times after one warm-up of each, in
    this process: fidelity of the plan's images to the unaccelerated ones, MAC and wall speedups.
    ``speedup_macs`` counts every MAC of the calls (text encoder and decoder too, as ``bench`` does),
    so that it is comparable with the wall-clock; ``speedup_macs_denoiser`` the denoiser's alone."""
    # the untimed runs count the MACs; the plan's warm-up executor's unit MACs spare the timed runs
    # the FLOP-counted first forward (a counter's overhead the unaccelerated runs do not pay)
    warm: list = []
    plan_macs = count_macs(lambda: warm.append(run_with_plan(pipe, fn, plan)[1]))
    base_macs = count_macs(lambda: warm.append(run_with_plan(pipe, fn, identity_plan(find_denoiser(pipe)[0]))[1]))
    base_times, fast_times, base, fast, executor = [], [], None, None, None
    for _ in range(max(1, pairs)):
        start = time.perf_counter()
        result = fn(pipe)
        base_times.append(time.perf_counter() - start)
        base = checked_images(result, "held-out") if base is None else base
        start = time.perf_counter()
        result, executor = run_with_plan(pipe, fn, plan, warm[0].unit_macs)
        fast_times.append(time.perf_counter() - start)
        fast = checked_images(result, "held-out") if fast is None else fast
    record = fidelity(fast, base)
    # against the baseline's own run: a plan with another sampler or step count does other work
    record.update(speedup_macs=base_macs / max(1, plan_macs),
                  speedup_macs_denoiser=warm[1].stats.full_macs / max(1, executor.stats.macs),
                  speedup_wall=wall_ratio(base_times, fast_times), seconds_base=sum(base_times) / len(base_times),
                  seconds_plan=sum(fast_times) / len(fast_times), images=len(base), pairs=len(base_times))
    return record

"""The held-out check: a plan against the unaccelerated pipeline on inputs it was not chosen on,
interleaved in this process (fidelity, MAC and wall-clock speedups)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from diffaccel.adapters import find_denoiser
from diffaccel.calibration.reference import checked_images, identity_plan, run_with_plan
from diffaccel.calibration.workload import Workload
from diffaccel.errors import SearchError
from diffaccel.eval.allocator import allocator_state
from diffaccel.eval.cost import count_macs
from diffaccel.eval.fidelity import fidelity
from diffaccel.eval.paired import paired_change
from diffaccel.eval.timing import wall_ratio
from diffaccel.plan import Plan
from diffaccel.search.judged import Judge, verdicts


def check_heldout_steps(calibrate: Any, heldout: Any) -> None:
    """Held-out calls at another step count than the calibration calls would refuse the plan at the end."""
    if isinstance(calibrate, Workload) and isinstance(heldout, Workload) \
            and heldout.num_inference_steps != calibrate.num_inference_steps:
        raise SearchError(f"the held-out calls ask for {heldout.num_inference_steps} steps and the calibration calls "
                          f"for {calibrate.num_inference_steps}: a plan is made for one step count; give them the same")


def compare(pipe: Any, fn: Callable, plan: Plan, pairs: int = 3, deadline: float | None = None,
            judge: Judge | None = None) -> dict:
    """Run ``fn`` without and with ``plan``, interleaved ``pairs`` times after one warm-up of each, in
    this process: fidelity of the plan's images to the unaccelerated ones, MAC and wall speedups.
    With ``deadline``, a pair that would end past it is not started (one pair always runs).
    ``speedup_macs`` counts every MAC of the calls (text encoder and decoder too, as ``bench`` does),
    so that it is comparable with the wall-clock; ``speedup_macs_denoiser`` the denoiser's alone.
    With ``judge`` (and ``fn`` a ``Workload``), ``judged``: the change of its verdicts (``paired_change``)."""
    # the untimed runs count the MACs; the plan's warm-up executor's unit MACs spare the timed runs
    # the FLOP-counted first forward (a counter's overhead the unaccelerated runs do not pay)
    warm: list = []
    plan_macs = count_macs(lambda: warm.append(run_with_plan(pipe, fn, plan)[1]))
    base_macs = count_macs(lambda: warm.append(run_with_plan(pipe, fn, identity_plan(find_denoiser(pipe)[0]))[1]))
    base_times, fast_times, base, fast, executor = [], [], None, None, None
    for _ in range(max(1, pairs)):
        if base_times and deadline is not None and time.time() + base_times[-1] + fast_times[-1] > deadline:
            break
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
                  seconds_plan=sum(fast_times) / len(fast_times), images=len(base), pairs=len(base_times),
                  allocator=allocator_state())
    if judge is not None and isinstance(fn, Workload):
        record["judged"] = paired_change(verdicts(judge, fast, fn), verdicts(judge, base, fn))
    return record


def heldout_seconds(run_seconds: float, pairs: int) -> float:
    """The held-out check's time, from one unaccelerated run of the held-out set (``run_seconds``)."""
    return run_seconds * (pairs + 1.4) * 1.5


def heldout_reserve(ctx: Any, heldout: Callable | None) -> float:
    """Seconds the held-out check of the chosen plan will take, estimated from the calibration run,
    so that the whole search ends near its time limit: ``pairs`` + 1 runs next to the baseline (a plan
    at about half its time; the untimed run of each counts MACs, which slows it by about 40%). The
    best hand-made plan's comparison is not reserved: it follows when it fits in the limit
    (``_past_limit``); reserving it took half of a 30-minute SD search for a comparison then skipped."""
    if heldout is None or not ctx.config.time_limit:
        return 0.0
    calls = len(heldout) / max(1, len(ctx.calib.calibrate)) \
        if hasattr(heldout, "calls") and hasattr(ctx.calib.calibrate, "calls") else 1.0
    seconds = heldout_seconds(ctx.calib.seconds * calls, ctx.config.pairs)
    if seconds > ctx.config.time_limit / 2:  # the search proper keeps at least half the limit
        ctx.log(f"warning: the held-out check is estimated at {seconds:.0f} s, more than half the "
                f"{ctx.config.time_limit:.0f} s limit: the search keeps half of it and the whole run will "
                "overrun the limit; give more time, or fewer held-out images (--heldout-per-class) or pairs")
        seconds = ctx.config.time_limit / 2
    return seconds


def heldout_check(ctx: Any, summary: dict, plan: Plan, heldout: Callable | None, best_hand: Any,
                  handmade: list) -> None:
    """Re-measure the chosen (and the best hand-made) plan on held-out seeds against the baseline."""
    if heldout is None:
        summary.update(heldout_psnr=None, speedup_macs=1 / summary["mac_fraction"], speedup_wall=None)
        return
    ctx.log("held-out check: the chosen plan against the unaccelerated pipeline")
    start = time.time()
    limit = ctx.started + ctx.config.time_limit if ctx.config.time_limit else None
    measured = compare(ctx.calib.pipe, heldout, plan, ctx.config.pairs, limit, ctx.judge)
    elapsed = time.time() - start
    if measured["pairs"] < ctx.config.pairs:
        ctx.log(f"held-out check: {measured['pairs']} of {ctx.config.pairs} timed pairs, within the time limit")
    summary.update(heldout_psnr=measured["psnr"], heldout_psnr_p5=measured["psnr_p5"],
                   heldout_psnr_min=measured["psnr_min"],
                   heldout_ssim=measured["ssim"], speedup_macs=measured["speedup_macs"],
                   speedup_macs_denoiser=measured["speedup_macs_denoiser"], speedup_wall=measured["speedup_wall"],
                   heldout_images=measured["images"], heldout_pairs=measured["pairs"], allocator=measured["allocator"],
                   heldout_judged=measured.get("judged"))
    quality = measured["psnr"] if ctx.budget.metric == "psnr" else measured["ssim"]
    summary["heldout_met"] = ctx.budget.accepts(quality, measured["psnr_p5"])
    if measured["speedup_wall"] is not None and measured["speedup_wall"] < 1:
        ctx.log(f"warning: on this machine the chosen plan ran slower than the unaccelerated pipeline "
                f"({measured['speedup_wall']:.2f}x wall-clock for {measured['speedup_macs']:.2f}x fewer MACs): the "
                "work it saves does not pay for what it adds here; search with --objective latency, or use none")
    if summary["met"] and not summary["heldout_met"]:
        ctx.log(f"warning: on the held-out seeds the chosen plan misses {ctx.budget.text} ({quality:.4g}"
                f"{ctx.budget.unit()}, 5th percentile {measured['psnr_p5']:.4g} dB): {len(ctx.calib.reference)} "
                "calibration images did not tell it apart; search again with more of them or a larger margin")
    if best_hand is not None and best_hand[0].source == summary.get("source") and summary.get("precision") is None:
        summary["best_handmade"].update(heldout_psnr=measured["psnr"], heldout_ssim=measured["ssim"], chosen=True,
                                        speedup_macs=measured["speedup_macs"], speedup_wall=measured["speedup_wall"])
    elif best_hand is not None and _past_limit(ctx, elapsed, measured, best_hand[0].latency_fraction):
        ctx.log("the best hand-made plan is not re-measured on the held-out seeds: that would end past the "
                "time limit (the search's own result is complete; its calibration scores are in best_handmade)")
        summary["best_handmade"]["heldout_skipped"] = "time limit"
    elif best_hand is not None:
        hand_plan = next(h.plan for h in handmade if h.key == best_hand[0].source)
        measured = compare(ctx.calib.pipe, heldout, hand_plan, ctx.config.pairs)
        summary["best_handmade"].update(heldout_psnr=measured["psnr"], heldout_ssim=measured["ssim"],
                                        speedup_macs=measured["speedup_macs"], speedup_wall=measured["speedup_wall"])


def _past_limit(ctx: Any, elapsed: float, measured: dict, latency_fraction: float) -> bool:
    """Whether a second comparison, of a plan at ``latency_fraction`` of the baseline's time, would end
    past the search's time limit: scaled from the one just made (``elapsed`` seconds, its MAC-counted
    runs included, which on a slow text-to-image pipeline cost more than the reserve's estimate)."""
    if not ctx.config.time_limit:
        return False
    ratio = measured["seconds_plan"] / max(measured["seconds_base"], 1e-9)
    needed = elapsed * (1 + latency_fraction) / (1 + ratio)
    return time.time() + needed > ctx.started + ctx.config.time_limit

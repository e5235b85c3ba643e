"""Scoring candidates on a calibration set: the unaccelerated images, the profile, and each plan's
quality and cost.

The calibration set is a callable ``calibrate(pipe) -> images``: it runs the pipeline on the
calibration inputs (prompts or labels, and fixed noise seeds) and returns the images as a tensor
``(N, C, H, W)`` in [0, 1] (an object with ``.images`` works too). Any supported diffusers
pipeline can be searched this way; ``embedded_calibration`` makes one for the embedded models.

One full-compute run gives, at once:

* the reference images every candidate is compared with (PSNR / SSIM, ``eval.fidelity``);
* per-sample MACs of the model and of each unit (the executor measures them on its first forward);
* per-forward wall time of the model and of each unit (timed with forward hooks), the basis of
  the latency estimate: a plan's latency fraction is computed like its MAC fraction, from unit
  seconds instead of unit MACs (a linear model that ignores the small cost of a cache read);
* the dissimilarity profile for DP and greedy: each unit's output at every step (a fixed strided
  subsample of at most ``PROFILE_ELEMENTS`` values per forward) and from it
  ``d[u, j, i] = |o_i - o_j|_1 / |o_i|_1``, the relative L1 change of unit ``u`` from step j to i.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffaccel.eval.cost import plan_mac_fraction
from diffaccel.eval.fidelity import fidelity
from diffaccel.plan import Plan, PlanError
from diffaccel.runtime.cache import tree_leaves
from diffaccel.runtime.executor import Executor, denoiser_and_scheduler
from diffaccel.search.errors import CalibrationError

PROFILE_ELEMENTS = 4096
Calibrate = Callable[[Any], Any]


def denoiser(pipe: Any) -> torch.nn.Module:
    model, _ = denoiser_and_scheduler(pipe)
    return model


def images_of(result: Any, what: str) -> torch.Tensor:
    images = getattr(result, "images", result)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise CalibrationError(f"the {what} callable must return images as a tensor (N, C, H, W) in [0, 1], "
                               f"got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] == 0:
        raise CalibrationError(f"the {what} set is empty or not a batch of images: got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise CalibrationError(f"the {what} run produced non-finite images")
    return images.detach().float().cpu()


def all_compute_plan(model: torch.nn.Module, units: list[str], num_steps: int, granularity: str) -> Plan:
    from diffaccel.methods.base import make_plan

    return make_plan(model, ["C" * len(units)] * num_steps, "none", {}, granularity=granularity)


@dataclass
class Scores:
    psnr: float
    psnr_min: float
    ssim: float
    mac_fraction: float
    latency_fraction: float
    seconds: float


class CalibrationRun:
    """The reference run on the calibration set, and the scoring of plans against it."""

    def __init__(self, pipe: Any, calibrate: Calibrate, num_steps: int, units: list[str],
                 granularity: str = "block"):
        self.pipe, self.calibrate, self.num_steps = pipe, calibrate, num_steps
        self.model, self.scheduler = denoiser_and_scheduler(pipe)
        self.units = units
        plan = all_compute_plan(self.model, units, num_steps, granularity)
        executor = Executor(self.model, plan)
        modules = [u.module for u in executor.units]
        store: dict[int, dict[int, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
        times = np.zeros(len(units) + 1)
        timed_forwards = [0]
        started: dict[int, float] = {}

        def pre(key):
            def hook(*_):
                started[key] = time.perf_counter()
            return hook

        last = {"step": 0, "overhead": 0.0}

        def post(key):
            def hook(module, args, output):
                now = time.perf_counter()
                step = executor.current_step
                if step is not None:
                    last["step"] = step
                if last["step"] > 0:  # step 0 runs under the FLOP counter: too slow to time
                    spent = now - started.pop(key, now)
                    if key < 0:
                        times[0] += spent - last["overhead"]
                        timed_forwards[0] += 1
                    else:
                        times[key + 1] += spent
                if key < 0:
                    last["overhead"] = 0.0
                elif step is not None:
                    flat = torch.cat([leaf.detach().reshape(-1).float() for leaf in tree_leaves(output)])
                    stride = max(1, flat.numel() // PROFILE_ELEMENTS)
                    store[key][step].append(flat[::stride][:PROFILE_ELEMENTS].clone())
                    last["overhead"] += time.perf_counter() - now
            return hook

        handles = [self.model.register_forward_pre_hook(pre(-1)), self.model.register_forward_hook(post(-1))]
        for index, module in enumerate(modules):
            handles += [module.register_forward_pre_hook(pre(index)), module.register_forward_hook(post(index))]
        executor.install(self.scheduler)
        start = time.perf_counter()
        try:
            result = self.calibrate(pipe)
        except PlanError as exc:
            raise CalibrationError(f"the calibration set does not fit this search: {exc}") from None
        except (ValueError, RuntimeError, TypeError, IndexError) as exc:
            raise CalibrationError(f"running the calibration set failed ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200]}); does it match the model?") from None
        finally:
            executor.remove()
            for handle in handles:
                handle.remove()
        self.seconds = time.perf_counter() - start
        self.reference = images_of(result, "calibration")
        if executor.stats.forwards == 0 or not executor.unit_macs:
            raise CalibrationError("the calibration callable never ran the pipeline's model")
        self.shape_macs = dict(executor.unit_macs)
        self.unit_macs = next(iter(self.shape_macs.values()))
        forwards = max(1, timed_forwards[0])
        self.unit_seconds = [float(t / forwards) for t in times]
        if self.unit_seconds[0] <= 0:
            self.unit_seconds = [float(m) for m in self.unit_macs]  # a 1-step run: fall back to MACs
        self.outputs = self._stack(store)
        self.dissimilarity = self._dissimilarity()

    def _stack(self, store) -> list[torch.Tensor | None]:
        """Per unit, its sampled outputs as (steps, elements); None for a unit not called at every step."""
        stacked = []
        for u in range(len(self.units)):
            outs = [torch.cat(store[u][s]) if store[u].get(s) else None for s in range(self.num_steps)]
            ok = all(o is not None for o in outs) and len({o.numel() for o in outs}) == 1
            stacked.append(torch.stack(outs).double() if ok else None)
        return stacked

    def _dissimilarity(self) -> np.ndarray:
        n, steps = len(self.units), self.num_steps
        d = np.zeros((n, steps, steps))
        for u, stacked in enumerate(self.outputs):
            if stacked is None:
                continue
            norms = stacked.abs().sum(1).clamp_min(1e-12)
            for i in range(1, steps):
                d[u, :i, i] = ((stacked[:i] - stacked[i]).abs().sum(1) / norms[i]).numpy()
        return d

    def unit_error(self, plan: Plan) -> np.ndarray:
        """q[u, t]: relative L1 distance of each unit's output under ``plan`` (an all-compute plan with
        quantization, say) from the full-precision output at the same step, on the calibration set."""
        executor = Executor(self.model, plan, unit_macs=self.shape_macs)
        store: dict[int, dict[int, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))

        def record(key):
            def hook(module, args, output):
                if executor.current_step is not None:
                    flat = torch.cat([leaf.detach().reshape(-1).float() for leaf in tree_leaves(output)])
                    stride = max(1, flat.numel() // PROFILE_ELEMENTS)
                    store[key][executor.current_step].append(flat[::stride][:PROFILE_ELEMENTS].clone())
            return hook

        handles = [u.module.register_forward_hook(record(i)) for i, u in enumerate(executor.units)]
        executor.install(self.scheduler)
        try:
            self.calibrate(self.pipe)
        finally:
            executor.remove()
            for handle in handles:
                handle.remove()
        q = np.zeros((len(self.units), self.num_steps))
        for u, (ref, got) in enumerate(zip(self.outputs, self._stack(store))):
            if ref is not None and got is not None and ref.shape == got.shape:
                q[u] = ((got - ref).abs().sum(1) / ref.abs().sum(1).clamp_min(1e-12)).numpy()
        return q

    # -- scoring ---------------------------------------------------------------------------------
    def fractions(self, plan: Plan) -> tuple[float, float]:
        return plan_mac_fraction(plan, self.unit_macs), plan_mac_fraction(plan, self.unit_seconds)

    def score(self, plan: Plan) -> Scores:
        start = time.perf_counter()
        images = run_with_plan(self.pipe, self.calibrate, plan, self.shape_macs)[0]
        images = images_of(images, "calibration")
        if images.shape != self.reference.shape:
            raise CalibrationError(f"the calibration callable returned {tuple(images.shape)} images under a plan "
                                   f"but {tuple(self.reference.shape)} without: it must be deterministic")
        quality = fidelity(images, self.reference)
        macs, latency = self.fractions(plan)
        return Scores(quality["psnr"], quality["psnr_min"], quality["ssim"], macs, latency,
                      time.perf_counter() - start)


def run_with_plan(pipe: Any, fn: Callable, plan: Plan, unit_macs: dict | None = None):
    """``fn(pipe)`` under ``plan``; returns (result, executor). ``unit_macs`` (from an earlier run of
    the same model) spares the executor its FLOP-counted first forward."""
    model, scheduler = denoiser_and_scheduler(pipe)
    executor = Executor(model, plan, unit_macs=unit_macs)
    executor.install(scheduler)
    try:
        result = fn(pipe)
    finally:
        executor.remove()
    return result, executor


def compare(pipe: Any, fn: Callable, plan: Plan, pairs: int = 3) -> dict:
    """Run ``fn`` without and with ``plan``, interleaved ``pairs`` times after one warm-up of each, in
    this process: fidelity of the plan's images to the unaccelerated ones, MAC and wall speedups."""
    from diffaccel.generate import wall_ratio

    run_with_plan(pipe, fn, plan)  # warm-up (and the plan's unit MACs)
    fn(pipe)
    base_times, fast_times, base, fast, executor = [], [], None, None, None
    for _ in range(max(1, pairs)):
        start = time.perf_counter()
        result = fn(pipe)
        base_times.append(time.perf_counter() - start)
        base = images_of(result, "held-out") if base is None else base
        start = time.perf_counter()
        result, executor = run_with_plan(pipe, fn, plan)
        fast_times.append(time.perf_counter() - start)
        fast = images_of(result, "held-out") if fast is None else fast
    record = fidelity(fast, base)
    record.update(speedup_macs=executor.stats.full_macs / executor.stats.macs,
                  speedup_wall=wall_ratio(base_times, fast_times), seconds_base=sum(base_times) / len(base_times),
                  seconds_plan=sum(fast_times) / len(fast_times), images=len(base), pairs=len(base_times))
    return record


def embedded_calibration(classes: list[int] | None, per_class: int, num_steps: int, guidance: float = 3.0,
                         seed: int = 0, calibration: bool = True, batch_size: int = 64) -> Calibrate:
    """A calibration (``calibration=True``: noise seeds from the calibration range, disjoint from
    evaluation seeds) or held-out (evaluation seeds, as ``diffaccel generate --seed``) set for the
    embedded models: ``per_class`` images of each class."""
    from diffaccel.generate import image_seed, sample
    from diffaccel.methods.base import CALIBRATION_SEED
    from diffaccel.zoo import shapes

    if per_class < 1:
        raise CalibrationError(f"the calibration set is empty: per-class count must be >= 1, got {per_class}")
    ids = list(range(shapes.NUM_CLASSES)) if classes is None else list(classes)
    if not ids:
        raise CalibrationError("the calibration set is empty: no classes")
    base = CALIBRATION_SEED + seed if calibration else seed
    labels = torch.tensor([c for c in ids for _ in range(per_class)])
    seeds = [image_seed(base, c, j) for c in ids for j in range(per_class)]

    def run(pipe):
        return sample(pipe, labels, seeds, num_steps, guidance, batch_size)

    run.description = (f"{'calibration' if calibration else 'evaluation'} seeds base {base}, classes {ids}, "
                       f"{per_class} per class, {num_steps} steps, guidance {guidance:g}")
    return run

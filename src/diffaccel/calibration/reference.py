"""The reference run on a calibration workload, and the scoring of plans against it.

One full-compute run of the workload (a ``Workload``, or any callable ``run(pipe) -> images``)
gives, at once:

* the reference images every candidate is compared with (PSNR / SSIM, ``eval.fidelity``);
* the number of denoiser evaluations per call (the plan's step count), counted by the executor;
* per-sample MACs of the model and of each unit (the executor measures them on its first forward);
* per-forward wall time of the model and of each unit (timed with forward hooks), the basis of
  the latency estimate: a plan's latency fraction is computed like its MAC fraction, from unit
  seconds instead of unit MACs (a linear model that ignores the small cost of a cache read), and a
  step with its guidance branch predicted saving what the half batch is measured to save;
* the dissimilarity profile for DP and greedy: each unit's output at every step (a fixed strided
  subsample of at most ``PROFILE_ELEMENTS`` values per forward) and from it
  ``d[u, j, i] = |o_i - o_j|_1 / |o_i|_1``, the relative L1 change of unit ``u`` from step j to i.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffaccel.adapters import adapter_for, find_denoiser
from diffaccel.calibration.workload import Workload, images_of
from diffaccel.errors import CalibrationError, PlanError, WorkloadError
from diffaccel.eval.cost import plan_mac_fraction, predicted_steps_saved
from diffaccel.eval.fidelity import fidelity, psnr_per_image
from diffaccel.fingerprint import fingerprint
from diffaccel.plan import CalibrationInfo, Plan
from diffaccel.runtime.cache import tree_leaves
from diffaccel.runtime.executor import Executor
from diffaccel.runtime.features.guidance import halved, is_guidance_batch
from diffaccel.runtime.fitted import scheduler_settings
from diffaccel.solvers.spec import SolverSpec

PROFILE_ELEMENTS = 4096
Calibrate = Callable[[Any], Any]  # a Workload, or any run(pipe) -> images


def identity_plan(model: torch.nn.Module, granularity: str = "block") -> Plan:
    """A plan that computes every unit at every step, at any step count (the reference runs)."""
    adapter = adapter_for(model)
    return Plan(adapter=adapter.name, model_class=type(model).__name__, units=adapter.unit_names(model, granularity),
                granularity=granularity, method="none")


def calibration_info(model: torch.nn.Module, calibrate: Calibrate, images: int, steps: int,
                     pipe: Any = None) -> CalibrationInfo:
    """The record a plan fitted on ``calibrate`` carries: the weights, the calls, their inputs, and
    ``pipe``'s scheduler."""
    workload = calibrate if isinstance(calibrate, Workload) else None
    return CalibrationInfo(
        weights=fingerprint(model), calls=len(workload) if workload else 0, images=images,
        inputs=list(workload.inputs[:64]) if workload else [], steps=steps,
        seeds=workload.description if workload else getattr(calibrate, "description", "custom"),
        scheduler=type(pipe.scheduler).__name__ if hasattr(pipe, "scheduler") else None,
        scheduler_config=scheduler_settings(pipe.scheduler) if hasattr(pipe, "scheduler") else None)


def sampled(output: Any) -> torch.Tensor:
    """A fixed strided subsample (at most ``PROFILE_ELEMENTS`` values) of a unit's output."""
    flat = torch.cat([leaf.detach().reshape(-1).float() for leaf in tree_leaves(output)])
    stride = max(1, flat.numel() // PROFILE_ELEMENTS)
    return flat[::stride][:PROFILE_ELEMENTS].clone()


def checked_images(result: Any, what: str) -> torch.Tensor:
    """A run's images (N, C, H, W) in [0, 1], or a CalibrationError saying what is wrong with them."""
    try:
        images = images_of(result)
    except WorkloadError as exc:
        raise CalibrationError(f"the {what} run returned no images: {exc}") from None
    if not torch.isfinite(images).all():
        raise CalibrationError(f"the {what} run produced non-finite images")
    return images


@dataclass
class Scores:
    psnr: float
    psnr_p5: float
    psnr_min: float
    ssim: float
    mac_fraction: float
    latency_fraction: float
    seconds: float
    psnr_std: float = 0.0  # spread of the per-image PSNR (the automatic search margin's input)


class CalibrationRun:
    """The reference run on the calibration workload, and the scoring of plans against it."""

    def __init__(self, pipe: Any, calibrate: Calibrate, granularity: str = "block", denoiser: str | None = None,
                 solver: SolverSpec | None = None):
        """``solver``: profile the run of that sampler (its plans are then scored against this
        run's images; a search scores every plan against the pipeline's own run)."""
        self.pipe, self.calibrate = pipe, calibrate
        if isinstance(calibrate, Workload):
            try:
                calibrate.num_inference_steps  # noqa: B018 -- raises when the calls differ
            except WorkloadError as exc:  # every plan made on these calls is indexed by one run's steps
                raise CalibrationError(str(exc)) from None
        self.model, self.scheduler = find_denoiser(pipe, denoiser)
        self.plan = identity_plan(self.model, granularity).model_copy(update={"solver": solver})
        self.units = list(self.plan.units)
        executor = Executor(self.model, self.plan)
        store: dict[int, dict[int, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
        times = np.zeros(len(self.units) + 1)
        timed = {"forwards": 0, "step": 0, "overhead": 0.0, "started": {}}
        handles = self._timing_hooks(executor, store, times, timed)
        first: list[tuple[tuple, dict]] = []

        def keep_first(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not first:
                first.append((args, kwargs))

        handles.append(self.model.register_forward_pre_hook(keep_first, with_kwargs=True))
        executor.install(self.scheduler, self.pipe)
        start = time.perf_counter()
        try:
            result = self.calibrate(pipe)
        except (PlanError, WorkloadError) as exc:
            raise CalibrationError(f"the calibration set does not fit: {exc}") from None
        except (ValueError, RuntimeError, TypeError, IndexError) as exc:
            raise CalibrationError(f"running the calibration set failed ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200]}); does it match the model?") from None
        finally:
            executor.remove()
            for handle in handles:
                handle.remove()
        self.seconds = time.perf_counter() - start
        self.reference = checked_images(result, "calibration")
        if executor.stats.forwards == 0 or not executor.unit_macs:
            raise CalibrationError("the calibration workload never ran the pipeline's denoiser")
        self.num_steps = executor.stats.steps
        self.first_forward = first[0]  # the denoiser's inputs at the first step (``forward_speed``)
        self._half_cost: float | None = None
        self.shape_macs = dict(executor.unit_macs)
        self.unit_macs = next(iter(self.shape_macs.values()))
        forwards = max(1, timed["forwards"])
        self.unit_seconds = [float(t / forwards) for t in times]
        if self.unit_seconds[0] <= 0:
            self.unit_seconds = [float(m) for m in self.unit_macs]  # a 1-step run: fall back to MACs
        self.outputs = self._stack(store)
        self.dissimilarity = self._dissimilarity()

    def _timing_hooks(self, executor: Executor, store, times: np.ndarray, timed: dict) -> list:
        """Forward hooks on the model and every unit: per-forward seconds, and each unit's sampled output."""
        started = timed["started"]

        def pre(key):
            def hook(*_):
                started[key] = time.perf_counter()
            return hook

        def post(key):
            def hook(module, args, output):
                now = time.perf_counter()
                step = executor.current_step
                if step is not None:
                    timed["step"] = step
                if timed["step"] > 0:  # step 0 runs under the FLOP counter: too slow to time
                    spent = now - started.pop(key, now)
                    if key < 0:
                        times[0] += spent - timed["overhead"]
                        timed["forwards"] += 1
                    else:
                        times[key + 1] += spent
                if key < 0:
                    timed["overhead"] = 0.0
                elif step is not None:
                    store[key][step].append(sampled(output))
                    timed["overhead"] += time.perf_counter() - now
            return hook

        handles = [self.model.register_forward_pre_hook(pre(-1)), self.model.register_forward_hook(post(-1))]
        for index, unit in enumerate(executor.units):
            handles += [unit.module.register_forward_pre_hook(pre(index)),
                        unit.module.register_forward_hook(post(index))]
        return handles

    def info(self) -> CalibrationInfo:
        """What the calibration ran, for the record of a plan fitted on it."""
        return calibration_info(self.model, self.calibrate, len(self.reference), self.num_steps, self.pipe)

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
                    store[key][executor.current_step].append(sampled(output))
            return hook

        handles = [u.module.register_forward_hook(record(i)) for i, u in enumerate(executor.units)]
        executor.install(self.scheduler, self.pipe)
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
        """MAC and latency fractions of the reference run: a plan with fewer (or more) denoiser
        evaluations (its solver section) costs that many steps' worth, a step with its guidance
        branch predicted half of one in MACs and ``half_batch_cost`` of one in time."""
        steps = plan.solver.evaluations if plan.solver is not None else self.num_steps
        if plan.schedule is None and plan.rule is not None:
            return 1.0, 1.0  # decided at run time: unknown here
        saved = predicted_steps_saved(plan)
        half = self.half_batch_cost() if saved else 0.5
        return tuple((plan_mac_fraction(plan, table) * steps - saved * cost) / self.num_steps
                     for table, cost in ((self.unit_macs, 1.0), (self.unit_seconds, 2 * (1 - half))))

    def score(self, plan: Plan) -> Scores:
        start = time.perf_counter()
        images = run_with_plan(self.pipe, self.calibrate, plan, self.shape_macs)[0]
        images = checked_images(images, "calibration")
        if images.shape != self.reference.shape:
            raise CalibrationError(f"the calibration callable returned {tuple(images.shape)} images under a plan "
                                   f"but {tuple(self.reference.shape)} without: it must be deterministic")
        quality = fidelity(images, self.reference)
        macs, latency = self.fractions(plan)
        spread = float(psnr_per_image(images, self.reference).std()) if len(images) > 1 else 0.0
        return Scores(quality["psnr"], quality["psnr_p5"], quality["psnr_min"], quality["ssim"], macs, latency,
                      time.perf_counter() - start, spread)

    def forward_speed(self, lowered: Callable[[], AbstractContextManager], repeats: int = 2) -> float:
        """How many times as fast one denoiser forward (the first step's, on the calibration inputs) runs
        inside ``lowered()`` (say, autocast to bfloat16, or the layers quantized) as without it:
        interleaved, the fastest of ``repeats`` each. A look that costs a few forwards, before whole
        runs are timed (where the arithmetic is emulated, a whole run of it can take ten times as long)."""
        args, kwargs = self.first_forward
        return self._fastest_ratio(lambda: self._forward_seconds(args, kwargs),
                                   lambda: self._forward_seconds(args, kwargs, lowered()), repeats)

    def half_batch_cost(self, repeats: int = 3) -> float:
        """Seconds of a denoiser forward on half the first step's batch (what a step with its guidance
        branch predicted runs) over those of the whole batch: measured once, interleaved, the fastest
        of ``repeats`` each. A small batch costs more than half (on the embedded PixArt on 1 CPU thread,
        2 images in 15 ms, 1 in 9-10): the latency model counts what a predicted step saves in time."""
        if self._half_cost is None:
            args, kwargs = self.first_forward
            try:
                sample = inspect.signature(self.model.forward).bind(*args, **kwargs).arguments.get(
                    adapter_for(self.model).sample_arg)
            except (TypeError, ValueError):  # a forward whose signature does not show its inputs
                sample = None
            if not is_guidance_batch(sample):
                self._half_cost = 0.5  # nothing to time: the MAC model's half
            else:
                batch = sample.shape[0]
                keep = slice(0, batch // 2)
                half_args, half_kwargs = halved(args, batch, keep), halved(kwargs, batch, keep)
                self._half_cost = self._fastest_ratio(lambda: self._forward_seconds(half_args, half_kwargs),
                                                      lambda: self._forward_seconds(args, kwargs), repeats)
        return self._half_cost

    def _forward_seconds(self, args: tuple, kwargs: dict, context: AbstractContextManager | None = None) -> float:
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), context or nullcontext():
            self.model(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    @staticmethod
    def _fastest_ratio(first: Callable[[], float], second: Callable[[], float], repeats: int) -> float:
        """The fastest of ``repeats`` timings of ``first`` over the fastest of ``second``, interleaved."""
        a, b = [], []
        for _ in range(repeats):
            a.append(first())
            b.append(second())
        return min(a) / min(b)

    def timed_against(self, plan: Plan, base: Plan, runs: int = 2) -> tuple[float, Scores]:
        """``plan``'s speed-up over ``base`` and ``plan``'s scores: both run ``runs`` times, interleaved
        (the machine's drift hits both alike), the ratio of their median seconds."""
        base_seconds, scores = [], []
        for _ in range(runs):
            base_seconds.append(self.score(base).seconds)
            scores.append(self.score(plan))
        return statistics.median(base_seconds) / statistics.median(s.seconds for s in scores), scores[0]


def run_with_plan(pipe: Any, fn: Callable, plan: Plan, unit_macs: dict | None = None,
                  **options: Any) -> tuple[Any, Executor]:
    """``fn(pipe)`` under ``plan``; returns (result, executor). ``unit_macs`` (from an earlier run of
    the same model) spares the executor its FLOP-counted first forward; ``options`` go to the executor."""
    model, scheduler = find_denoiser(pipe, options.pop("denoiser", None))
    executor = Executor(model, plan, unit_macs=unit_macs, **options)
    executor.install(scheduler, pipe)
    try:
        result = fn(pipe)
    finally:
        executor.remove()
    return result, executor

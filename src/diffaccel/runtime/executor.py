"""The executor: applies a Plan to a model for the duration of a call, and leaves no trace.

It replaces the ``forward`` of the model and of each unit with a wrapper (an instance attribute,
removed again on exit, so the model's own class methods are never touched). All cache state lives
in per-run ``BranchState`` objects: one per batch shape and classifier-free-guidance branch,
created when a new trajectory starts and discarded when the run or the context ends.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from diffaccel.adapters import Adapter, adapter_for
from diffaccel.eval.cost import FlopCounterMode  # with CPU attention registered
from diffaccel.plan import Plan, PlanError
from diffaccel.quant.apply import QuantHandle, quantized_layers, swap_in
from diffaccel.quant.calibrate import Calibration
from diffaccel.runtime.cache import UnitCache, primary, structure, tree_leaves, tree_map


class CacheError(PlanError):
    """A cached tensor went bad (NaN or infinity) while a plan was running."""


@dataclass
class Stats:
    """Work actually done, summed over forwards since the last reset."""

    forwards: int = 0
    computed: int = 0
    reused: int = 0
    forecast: int = 0
    macs: int = 0
    full_macs: int = 0  # what the same forwards cost without the plan

    @property
    def mac_ratio(self) -> float:
        return self.full_macs / self.macs if self.macs else float("nan")

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "computed": self.computed, "reused": self.reused,
                "forecast": self.forecast, "macs": self.macs, "full_macs": self.full_macs}


@dataclass
class BranchState:
    """Cache state of one trajectory (one batch shape, one guidance branch)."""

    step: int = -1
    last_t: float | None = None
    caches: dict[int, UnitCache] = field(default_factory=lambda: defaultdict(UnitCache))
    decision: str = "C"  # the rule's choice for the skippable units at this step
    reference: torch.Tensor | None = None  # first blocks' residual at the last computed step
    head_input: torch.Tensor | None = None
    consecutive: int = 0
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # parallel-decoded outputs
    tile: int = 1  # batch multiple of the current (parallel-decoding) forward
    # a run of consecutive residual units skipped alike acts as one: its first unit adds the run's
    # summed residual, the others pass their input through (one tensor pass instead of one per unit)
    passthrough: set[int] = field(default_factory=set)  # units that pass their input through this step
    run_sums: dict[tuple[int, int], UnitCache] = field(default_factory=dict)


def _float_timestep(t: Any) -> float:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0])
    return float(t)


class Executor:
    def __init__(self, model: torch.nn.Module, plan: Plan, adapter: Adapter | None = None,
                 check_finite: bool = True, unit_macs: dict[tuple, list[int]] | None = None):
        """``unit_macs`` (an earlier executor's ``unit_macs`` for the same model) spares the
        FLOP-counted first forward of each input shape."""
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.plan = plan
        self.check_finite = check_finite
        if plan.adapter != self.adapter.name:
            raise PlanError(f"this plan was made for the {plan.adapter!r} adapter ({plan.model_class}); "
                            f"the model is a {type(model).__name__} ({self.adapter.name!r}): make a plan for it")
        self.units = self.adapter.units(model, plan.granularity)
        names = [u.name for u in self.units]
        if names != list(plan.units):
            raise PlanError(f"the plan's units do not match this model: the plan lists {len(plan.units)} units "
                            f"({', '.join(plan.units[:4])}, ...), the model has {len(names)} "
                            f"({', '.join(names[:4])}, ...); make the plan for this model")
        if plan.parallel_decode and not self.adapter.supports_parallel_decode:
            raise PlanError(f"parallel decoding needs a U-Net; the {self.adapter.name} adapter has no decoder")
        self.stats = Stats()
        self._states: dict[tuple, BranchState] = {}
        self._current: BranchState | None = None
        # per-sample input shape -> per-sample MACs [whole model, unit 0, unit 1, ...]
        self.unit_macs: dict[tuple, list[int]] = dict(unit_macs or {})
        self._timesteps: list[float] | None = list(plan.timesteps) if plan.timesteps else None
        self._saved: list[tuple[Any, str, Any, bool]] = []
        self._quant = QuantHandle()
        # quantized layers are built (and the request checked) once, then swapped in on every install
        self._quant_layers = [] if plan.quant is None else quantized_layers(
            model, plan.quant, Calibration.load(plan.quant.calibration), clock=lambda: self.current_step)
        self._measuring: list[int] | None = None
        self._keep = max(plan.forecast_order, plan.rule.forecast_order if plan.rule else 0) + 1
        self._skippable = self._rule_span()
        # the fitted per-channel biases as tensors once, not on every reused unit of every step
        correction = plan.correction
        self._bias_rows = [torch.tensor(row) for row in correction.bias] if correction and correction.bias else []
        self._feature_fits = self._fits(plan)

    @property
    def current_step(self) -> int | None:
        """The step of the model forward running now (None outside one); for hooks and profilers."""
        return self._current.step if self._current is not None else None

    # -- install / remove --------------------------------------------------------------------------
    def _patch(self, obj: Any, name: str, replacement: Any) -> None:
        had = name in vars(obj)
        self._saved.append((obj, name, vars(obj).get(name), had))
        setattr(obj, name, replacement)

    def install(self, scheduler: Any = None) -> None:
        if getattr(self.model, "_diffaccel_executor", None) is not None:
            raise PlanError("a plan is already applied to this model; disable it first")
        try:
            self._quant = swap_in(self._quant_layers)
            original = self.model.forward
            self._signature = inspect.signature(original)
            self._patch(self.model, "forward", lambda *a, **k: self._model_forward(original, a, k))
            for index, unit in enumerate(self.units):
                unit_original = unit.module.forward
                self._patch(unit.module, "forward",
                            lambda *a, _i=index, _f=unit_original, **k: self._unit_forward(_i, _f, a, k))
            if scheduler is not None:
                self._hook_scheduler(scheduler)
            elif self.plan.noise_injection is not None or self.plan.step_scale is not None:
                raise PlanError("noise injection and step adjustment act on the scheduler's latents: "
                                "pass the pipeline, not the model")
            self._patch(self.model, "_diffaccel_executor", self)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        self._quant.restore()
        while self._saved:
            obj, name, value, had = self._saved.pop()
            if had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)
        self._states.clear()
        self._current = None

    def _hook_scheduler(self, scheduler: Any) -> None:
        set_timesteps, step_fn = scheduler.set_timesteps, scheduler.step
        run = {"step": 0, "z": None}

        def on_set_timesteps(*args, **kwargs):
            out = set_timesteps(*args, **kwargs)
            self.new_run([_float_timestep(t) for t in scheduler.timesteps])
            run.update(step=0, z=None)
            return out

        def on_step(model_output, timestep, sample, *args, **kwargs):
            out = step_fn(model_output, timestep, sample, *args, **kwargs)
            scale = self.plan.step_scale[run["step"]] if self.plan.step_scale else 1.0
            if scale != 1.0:
                prev = out.prev_sample if hasattr(out, "prev_sample") else out[0]
                prev.sub_(sample).mul_(scale).add_(sample)
            inject = self.plan.noise_injection
            if inject is not None:
                if run["z"] is None:
                    run["z"] = sample.clone()
                if run["step"] >= inject.from_step and inject.strength > 0:
                    prev = out.prev_sample if hasattr(out, "prev_sample") else out[0]
                    prev.add_(run["z"], alpha=inject.strength)
            run["step"] += 1
            return out

        self._patch(scheduler, "set_timesteps", on_set_timesteps)
        self._patch(scheduler, "step", on_step)

    def new_run(self, timesteps: list[float] | None = None) -> None:
        """Forget all cache state (a pipeline call starts); check the step count against the plan."""
        self._states.clear()
        self.stats = Stats()
        if timesteps is not None:
            if self.plan.num_steps is not None and len(timesteps) != self.plan.num_steps:
                raise PlanError(f"the plan is for {self.plan.num_steps} steps but the pipeline runs "
                                f"{len(timesteps)}: make the plan for {len(timesteps)} steps")
            self._timesteps = timesteps

    # -- the model's forward -----------------------------------------------------------------------
    def _branch(self, shape: tuple, t: float) -> BranchState:
        branch = 0
        while (shape, branch) in self._states and self._states[(shape, branch)].last_t == t:
            branch += 1
        state = self._states.get((shape, branch))
        if state is None or (state.last_t is not None and t >= state.last_t):
            state = self._states[(shape, branch)] = BranchState()
        return state

    def _model_forward(self, original, args: tuple, kwargs: dict):
        if self._current is not None:  # re-entrant call (e.g. parallel decoding): plain pass-through
            return original(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        sample = bound.arguments[self.adapter.sample_arg]
        t = _float_timestep(bound.arguments[self.adapter.timestep_arg])
        state = self._branch(tuple(sample.shape), t)
        state.step += 1
        state.last_t = t
        state.passthrough = set()
        step = state.step
        if self.plan.num_steps is not None and step >= self.plan.num_steps:
            raise PlanError(f"the plan is for {self.plan.num_steps} steps but the sampler asked for step "
                            f"{step + 1}: make the plan for this number of steps")
        if step in state.pending:  # computed ahead by parallel decoding
            self.stats.forwards += 1
            return self._template(state.pending.pop(step))
        per_sample = tuple(sample.shape[1:])
        self._shape, self._batch = per_sample, sample.shape[0]
        if per_sample not in self.unit_macs:
            if step != 0:
                raise PlanError("the first forward of a new input shape must compute every unit")
            out = self._measured_forward(original, args, kwargs, state)
        else:
            run = self._decoder_run(step)
            if run > 1:
                out = self._parallel_decode(original, bound, state, step, run)
            else:
                out = self._run(original, args, kwargs, state)
        total = self.unit_macs[per_sample][0] * self._batch
        self.stats.full_macs += total
        self.stats.macs += total
        return out

    def _run(self, original, args, kwargs, state: BranchState):
        self._current = state
        state.decision = "C"
        try:
            out = original(*args, **kwargs)
        finally:
            self._current = None
        self.stats.forwards += 1
        return out

    def _measured_forward(self, original, args, kwargs, state):
        """Run the first (all-compute) forward of a shape under torch's FLOP counter, each unit
        under a nested counter of its own, to learn the MACs of the model and of every unit."""
        self._measuring = [0] * (len(self.units) + 1)
        try:
            with FlopCounterMode(display=False) as counter:
                out = self._run(original, args, kwargs, state)
            self._measuring[0] = counter.get_total_flops()
            self.unit_macs[self._shape] = [f // 2 // self._batch for f in self._measuring]
        finally:
            self._measuring = None
        return out

    # -- units ----------------------------------------------------------------------------------
    def _rule_span(self) -> range:
        rule = self.plan.rule
        return range(rule.first_blocks, len(self.units) - rule.last_blocks) if rule else range(0)

    def _action(self, state: BranchState, index: int) -> str:
        if self.plan.rule is None:
            return self.plan.action(state.step, index)
        return state.decision if index in self._skippable else "C"

    def _unit_forward(self, index: int, original, args: tuple, kwargs: dict):
        state = self._current
        if state is None:  # the unit is called outside a tracked model forward
            return original(*args, **kwargs)
        unit = self.units[index]
        cache = state.caches[index]
        action = self._action(state, index)
        if self.plan.rule is not None and index == 0:
            state.head_input = primary(unit.residual_inputs(args, kwargs)) if unit.residual_inputs else None
        if action == "C" or not cache.ready:
            return self._compute(index, original, args, kwargs, state, cache)
        self._charge(index, computed=False)
        self.stats.reused += action == "R"
        self.stats.forecast += action == "F"
        order = self.plan.rule.forecast_order if self.plan.rule else self.plan.forecast_order
        if index in state.passthrough:
            return unit.residual_inputs(args, kwargs)
        if unit.residual_inputs is not None and self.plan.correction is None \
                and self.plan.feature_correction is None and state.tile == 1:
            run = self._run_cache(state, index, action)
            base = unit.residual_inputs(args, kwargs)
            if action == "R":
                return tree_map(lambda x, r: x + r, base, run.last())
            return run.forecast(state.step, order, base=base)
        value = cache.last() if action == "R" else cache.forecast(state.step, order)
        value = self._corrected(value, state.step)
        fit = self._feature_fits.get((state.step, index))
        if fit is not None:
            value = self._fitted(value, *fit)
        if state.tile > 1:
            value = tree_map(lambda v: v.repeat(state.tile, *([1] * (v.dim() - 1))), value)
        if unit.residual_inputs is None:
            return value
        return tree_map(lambda x, r: x + r, unit.residual_inputs(args, kwargs), value)

    def _run_cache(self, state: BranchState, first: int, action: str) -> UnitCache:
        """The summed cache of the run of residual units from ``first`` skipped with ``action`` at
        this step and computed at the same steps; marks the run's other units as pass-through."""
        steps, shape = state.caches[first].steps, structure(state.caches[first].last())
        last = first
        while (last + 1 < len(self.units) and self.units[last + 1].residual_inputs is not None
               and self._action(state, last + 1) == action and state.caches[last + 1].steps == steps
               and structure(state.caches[last + 1].last()) == shape):
            last += 1
        state.passthrough = set(range(first + 1, last + 1))
        if last == first:
            return state.caches[first]
        run = state.run_sums.get((first, last))
        if run is None or run.steps != steps:  # (re)build after the units computed again
            values = [state.caches[k].values for k in range(first, last + 1)]
            summed = [tree_map(lambda *leaves: functools.reduce(torch.add, leaves), *point) for point in zip(*values)]
            run = state.run_sums[(first, last)] = UnitCache(list(steps), summed)
        return run

    def _compute(self, index, original, args, kwargs, state: BranchState, cache: UnitCache):
        unit = self.units[index]
        if self._measuring is not None:
            with FlopCounterMode(display=False) as counter:
                out = original(*args, **kwargs)
            self._measuring[index + 1] += counter.get_total_flops()
        else:
            out = original(*args, **kwargs)
        value = out if unit.residual_inputs is None else tree_map(
            lambda y, x: y - x, out, unit.residual_inputs(args, kwargs))
        if state.tile > 1:  # keep the first copy of a tiled (parallel-decoding) batch
            value = tree_map(lambda v: v[: v.shape[0] // state.tile], value)
        if self.check_finite and not all(torch.isfinite(v).all() for v in tree_leaves(value)):
            raise CacheError(f"unit {unit.name} produced a non-finite value at step {state.step}: the model "
                             "or its input is broken (NaN or infinity); nothing was cached")
        cache.store(state.step, value, self._keep)
        self._charge(index, computed=True)
        if self.plan.rule is not None and index == self._skippable.start - 1:
            self._decide(state, out)
        return out

    def _charge(self, index: int, computed: bool) -> None:
        if computed:
            self.stats.computed += 1
            return
        table = self.unit_macs.get(self._shape)
        if table is not None:
            self.stats.macs -= table[index + 1] * self._batch

    def _corrected(self, value, step: int):
        corr = self.plan.correction
        if corr is None:
            return value
        gain = corr.gain[step]
        bias = self._bias_rows[step] if self._bias_rows else None

        def apply(v: torch.Tensor) -> torch.Tensor:
            out = v * gain
            if bias is not None and bias.numel() == v.shape[-1]:
                out = out + bias.to(dtype=v.dtype, device=v.device)
            return out

        return tree_map(apply, value)

    def _fits(self, plan: Plan) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """The per-channel feature corrections as tensors, by (step, unit index)."""
        fc = plan.feature_correction
        if fc is None:
            return {}
        index = {name: i for i, name in enumerate(plan.units)}
        return {(f.step, index[f.unit]): (torch.tensor(f.gain), torch.tensor(f.bias) if f.bias else None)
                for f in fc.fits}

    def _fitted(self, value, gain: torch.Tensor, bias: torch.Tensor | None):
        axis = self.plan.feature_correction.axis

        def apply(v: torch.Tensor) -> torch.Tensor:
            dim = axis % v.dim()
            if v.shape[dim] != gain.numel():  # another leaf of a tuple output: left as it is
                return v
            shape = [1] * v.dim()
            shape[dim] = -1
            out = v * gain.to(v).reshape(shape)
            return out if bias is None else out + bias.to(v).reshape(shape)

        return tree_map(apply, value)

    # -- the dynamic rule ---------------------------------------------------------------------------
    def _decide(self, state: BranchState, head_output) -> None:
        rule = self.plan.rule
        residual = primary(head_output) - state.head_input if state.head_input is not None else primary(head_output)
        can_skip = state.step >= rule.warmup and state.consecutive < rule.max_consecutive \
            and state.reference is not None and all(state.caches[i].ready for i in self._skippable)
        if can_skip:
            change = (residual - state.reference).abs().mean() / state.reference.abs().mean().clamp_min(1e-12)
            can_skip = float(change) < rule.threshold
        if can_skip:
            state.decision = "F" if rule.forecast_order > 0 else "R"
            state.consecutive += 1
        else:
            state.decision = "C"
            state.consecutive = 0
            state.reference = residual

    # -- parallel decoding ----------------------------------------------------------------------------
    def _decoder_run(self, step: int) -> int:
        """Length of the run of decoder-only steps starting at ``step`` (1 if none)."""
        if not self.plan.parallel_decode or self.plan.schedule is None:
            return 1
        encoder = [i for i, u in enumerate(self.units) if u.role == "encoder"]

        def decoder_only(s: int) -> bool:
            return all(self.plan.schedule[s][i] == "R" for i in encoder)

        run = 0
        while step + run < self.plan.num_steps and decoder_only(step + run):
            run += 1
        return max(run, 1)

    def _parallel_decode(self, original, bound, state: BranchState, step: int, run: int):
        if self._timesteps is None:
            raise PlanError("parallel decoding needs the timesteps: pass the pipeline, or a plan with timesteps")
        sample = bound.arguments[self.adapter.sample_arg]
        batch = sample.shape[0]
        ts = self._timesteps[step:step + run]
        t_arg = bound.arguments[self.adapter.timestep_arg]
        dtype = t_arg.dtype if isinstance(t_arg, torch.Tensor) else torch.float32
        times = torch.tensor(ts, dtype=dtype, device=sample.device).repeat_interleave(batch)
        for name, value in list(bound.arguments.items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                bound.arguments[name] = value.repeat(run, *([1] * (value.dim() - 1)))
        bound.arguments[self.adapter.timestep_arg] = times
        state.tile = run
        self._batch = batch * run
        try:
            out = self._run(original, bound.args, bound.kwargs, state)
        finally:
            state.tile = 1
        sample_out = out.sample if hasattr(out, "sample") else out[0]
        chunks = sample_out.chunk(run)
        for k in range(1, run):
            state.pending[step + k] = chunks[k]
        self._template = (lambda c: type(out)(sample=c)) if hasattr(out, "sample") else (lambda c: (c,))
        return self._template(chunks[0])


@contextlib.contextmanager
def accelerate(target: Any, plan: Plan, check_finite: bool = True) -> Iterator[Executor]:
    """Apply ``plan`` to a pipeline (``pipe.transformer`` / ``pipe.unet``) or a bare model inside
    the ``with`` block; the model is restored on exit, also after an exception."""
    executor = enable(target, plan, check_finite)
    try:
        yield executor
    finally:
        disable(target)


def denoiser_and_scheduler(target: Any) -> tuple[torch.nn.Module, Any]:
    if isinstance(target, torch.nn.Module):
        return target, None
    for name in ("transformer", "unet"):
        model = getattr(target, name, None)
        if isinstance(model, torch.nn.Module):
            return model, getattr(target, "scheduler", None)
    raise PlanError(f"{type(target).__name__} is neither a model nor a pipeline with a transformer or unet")


def enable(target: Any, plan: Plan, check_finite: bool = True) -> Executor:
    """Apply ``plan`` until ``disable(target)``; returns the executor (its ``stats`` count the work)."""
    model, scheduler = denoiser_and_scheduler(target)
    executor = Executor(model, plan, check_finite=check_finite)
    executor.install(scheduler)
    return executor


def disable(target: Any) -> None:
    model, _ = denoiser_and_scheduler(target)
    executor = getattr(model, "_diffaccel_executor", None)
    if executor is not None:
        executor.remove()

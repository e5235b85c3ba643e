"""The executor core: applies a Plan to a model for the duration of a call, and leaves no trace.

It replaces the ``forward`` of the model and of each unit with a wrapper (an instance attribute,
removed again on exit, so the model's own class methods are never touched), counts steps through
the scheduler (``clock.py``), keeps cache state per run and guidance branch (``state.py``), serves
each unit's action and counts the MACs it really ran. Everything else a plan asks for (the dynamic
rule, corrections, parallel decoding, scheduler adjustments, quantization) is a feature
(``features/``) that the core calls through a few hooks.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

from diffaccel.adapters import Adapter, adapter_for
from diffaccel.errors import PlanError
from diffaccel.eval.cost import FlopCounterMode, condition_shapes, register_flop_formulas
from diffaccel.plan import Plan
from diffaccel.runtime import features as feature_modules
from diffaccel.runtime.cache import UnitCache, all_finite, non_finite_error, tree_map
from diffaccel.runtime.clock import StepClock, StepHook, timestep_value
from diffaccel.runtime.features import Feature, overrides
from diffaccel.runtime.fitted import check_scheduler, check_weights, plan_for_run
from diffaccel.runtime.guard import NESTED, Guard, check_scheduler_free, register
from diffaccel.runtime.patches import Patches, Saved
from diffaccel.runtime.sampler import plan_scheduler, release_plan_scheduler
from diffaccel.runtime.state import BranchState, Stats, merged_run

log = logging.getLogger("diffaccel")


class Executor(Patches):
    def __init__(self, model: torch.nn.Module, plan: Plan, adapter: Adapter | None = None,
                 check_finite: bool = True, unit_macs: dict[tuple, list[int]] | None = None,
                 resample: bool = False, merge_runs: bool = True):
        """``check_finite``: check the denoiser's output for NaN/inf at every call (one reduction and
        one host sync) and name the computed unit that produced it. ``resample``: map a static plan
        onto the step count of each run (``Plan.resample``) instead of refusing a run of another
        length. ``unit_macs`` (an earlier executor's for the same model) spares the FLOP-counted
        first forward of each input shape.
        ``merge_runs`` False serves every reused unit on its own (for fitting per-unit corrections)."""
        register_flop_formulas()
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.check_finite = check_finite
        self.resample = resample
        self.merge_runs = merge_runs
        if plan.adapter != self.adapter.name:
            raise PlanError(f"this plan was made for the {plan.adapter!r} adapter ({plan.model_class}); "
                            f"the model is a {type(model).__name__} ({self.adapter.name!r}): make a plan for it")
        self.adapter.check_arguments(model)
        self.units = self.adapter.units(model, plan.granularity)
        names = [u.name for u in self.units]
        if names != list(plan.units):
            raise PlanError(f"the plan's units do not match this model: the plan lists {len(plan.units)} units "
                            f"({', '.join(plan.units[:4])}, ...), the model has {len(names)} "
                            f"({', '.join(names[:4])}, ...); make the plan for this model")
        check_weights(model, plan)
        self.source_plan = plan
        self.stats = Stats()
        self.clock = StepClock()
        self.unit_macs: dict[tuple, list[int]] = dict(unit_macs or {})  # by mac_key: sample and condition shapes
        self.mac_key: tuple = ()
        self._states: dict[Any, BranchState] = {}
        self._current: BranchState | None = None
        self._saved: list[Saved] = []
        self.guard: Guard | None = None  # set by install: checks every call that enters the executor
        self._measuring: list[int] | None = None
        self.scheduler: Any = None  # the one whose steps are counted (set by install)
        self._pipe: Any = None
        self._pending_run = False  # timesteps set, the run's first forward still to come
        self.features: list[Feature] = []
        self.step_observers: list[StepHook] = []  # called after every scheduler step: (step, sample, prev)
        self._use(plan)

    def _use(self, plan: Plan) -> None:
        """Make ``plan`` the active one (at construction, and when a run is resampled)."""
        self.plan = plan
        self.features = feature_modules.build(plan, self, self.features)
        self._hooks = {hook: [f for f in self.features if overrides(f, hook)] for hook in (
            "forward", "before_forward", "action", "before_unit", "after_compute", "serve", "after_step",
            "start_run")}
        # a run of reused blocks is served summed at its first only where no block's output is read elsewhere
        self._merge = self.merge_runs and "residual-chain" in self.adapter.capabilities and not any(
            f.edits_served_values for f in self.features)
        self._order = plan.rule.forecast_order if plan.rule else plan.forecast_order
        self._keep = max(plan.forecast_order, self._order) + 1
        # only the outputs a later step may serve are kept (an all-compute plan stores nothing)
        self._stored = range(len(self.units)) if plan.rule or self._hooks["action"] else plan.served_units()

    @property
    def current_step(self) -> int | None:
        """The step of the model forward running now, or, between a pipeline's forwards, the step its
        scheduler is on (None outside a run); for hooks and profilers."""
        if self._current is not None:
            return self._current.step
        return self.clock.step if self.clock.active and self.clock.step < self.clock.expected_steps else None

    def timesteps(self) -> list[float] | None:
        """The timesteps of the current run (from the scheduler, else the plan's)."""
        if self.clock.active:
            return self.clock.timesteps[self.clock.begin:]
        return list(self.plan.timesteps) if self.plan.timesteps else None

    # -- install / remove --------------------------------------------------------------------------
    def install(self, scheduler: Any = None, pipe: Any = None) -> None:
        """Apply the plan until ``remove()``; ``scheduler`` (the pipeline's) counts steps, ``pipe`` is
        needed by plans with a solver section, whose scheduler replaces the pipeline's meanwhile."""
        if getattr(self.model, "_diffaccel_executor", None) is not None:
            raise PlanError(NESTED)
        if self.plan.solver is None:
            check_scheduler_free(scheduler)
        guard = self.guard = Guard(self.model, pipe)
        bare_forward = self.model.forward  # what a wrapper left in place after the plan's removal calls
        try:
            if self.plan.solver is not None:
                scheduler = plan_scheduler(self.plan, pipe, self.adapter, self.model)
                self.patch(pipe, "scheduler", scheduler)
            check_scheduler(self.plan, scheduler)
            if scheduler is None and any(f.needs_scheduler for f in self.features):
                raise PlanError("noise injection and step adjustment act on the scheduler's latents: "
                                "pass the pipeline, not the model")
            for feature in self.features:
                feature.install()
            original = self.model.forward
            self._signature = inspect.signature(original)

            @functools.wraps(original)
            def model_forward(*args, **kwargs):
                if not guard.enter():
                    return bare_forward(*args, **kwargs)
                return self._model_forward(original, args, kwargs)

            self.patch(self.model, "forward", model_forward)
            swapped = {key: new for feature in self.features for key, new in feature.swapped().items()}
            for index, unit in enumerate(self.units):
                module = swapped.get(id(unit.module), unit.module)  # a unit that is itself a swapped layer
                unit_original = module.forward
                self.patch(module, "forward", functools.wraps(unit_original)(
                    lambda *a, _i=index, _f=unit_original, **k: self._unit_forward(_i, _f, a, k)))
            self.clock = StepClock()
            if scheduler is not None:
                self.clock.hook(scheduler, self.patch, guard, self._run_set, self._after_step)
            self.scheduler, self._pipe = scheduler, pipe
            self.patch(self.model, "_diffaccel_executor", self)
            register(pipe, self)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Undo ``install``; a wrapper another library put over one of ours since is left working."""
        if self.guard is not None:
            self.guard.close(self)
        for feature in self.features:
            feature.remove()
        self.undo_patches()
        if self.plan.solver is not None:
            release_plan_scheduler(self.scheduler)
        self._states.clear()
        self._current = None
        self.clock = StepClock()
        self.scheduler = self._pipe = None

    def _run_set(self) -> None:
        """The timesteps are set: the run starts at its first forward, where an image-to-image begins."""
        self._pending_run = True

    def _fit_plan(self) -> None:
        """The plan for the run's step count (as it is, mapped when asked, or refused)."""
        steps = self.clock.expected_steps
        if not self.source_plan.step_free and steps != self.plan.num_steps:
            self._use(plan_for_run(self.source_plan, steps, len(self.clock.timesteps), self.resample))

    def _start_run(self) -> None:
        """A pipeline call starts: forget all cache state; fit the plan to the run's step count."""
        self._pending_run, self.stats = False, Stats()
        self._states.clear()
        if self.resample or not self.clock.in_doubt:  # else the second step says which count to refuse
            self._fit_plan()
        for feature in self._hooks["start_run"]:
            feature.start_run()

    def _after_step(self, step: int, sample: torch.Tensor, prev: torch.Tensor) -> None:
        for feature in self._hooks["after_step"]:
            feature.after_step(step, sample, prev)
        for observer in self.step_observers:
            observer(step, sample, prev)

    # -- the model's forward -----------------------------------------------------------------------
    def _branch(self, shape: tuple, t: float) -> BranchState:
        """The state of the trajectory this forward continues."""
        if self.clock.active:  # the k-th call of a step is branch k
            branch = self.clock.next_branch()
            state = self._states.get(branch)
            if state is None:
                state = self._states[branch] = BranchState()
            state.step = self.clock.step
            return state
        # no scheduler: a repeated timestep is another branch, a timestep that does not decrease a new run
        branch = 0
        while (shape, branch) in self._states and self._states[(shape, branch)].last_t == t:
            branch += 1
        state = self._states.get((shape, branch))
        if state is None or (state.last_t is not None and t >= state.last_t):
            state = self._states[(shape, branch)] = BranchState()
        state.step += 1
        return state

    def _model_forward(self, original, args: tuple, kwargs: dict):
        if self._current is not None:  # re-entrant call (e.g. parallel decoding): plain pass-through
            return original(*args, **kwargs)
        if self._pipe is not None and getattr(self._pipe, "scheduler", None) is not self.scheduler:
            raise PlanError("the pipeline's scheduler was replaced inside the accelerate block, so its steps are not "
                            "counted and the plan's rows would not match them: set pipe.scheduler before applying it")
        bound = self._signature.bind(*args, **kwargs)
        sample = bound.arguments[self.adapter.sample_arg]
        t = timestep_value(bound.arguments[self.adapter.timestep_arg])
        if self._pending_run:
            self.clock.find_begin(t, None if self.source_plan.step_free else self.source_plan.num_steps)
            self._start_run()
        elif self.clock.recheck_begin(t):  # PNDM's twice-evaluated timestep had left the start in doubt:
            self._fit_plan()  # the first step computed every unit under any plan, so its caches stand
        state = self._branch(tuple(sample.shape), t)
        state.last_t, state.passthrough = t, set()
        self.stats.steps = max(self.stats.steps, state.step + 1)
        if self.plan.num_steps is not None and state.step >= self.plan.num_steps:
            raise PlanError(f"the plan is for {self.plan.num_steps} steps but the sampler asked for step "
                            f"{state.step + 1}: make the plan for this number of steps")
        for feature in self._hooks["forward"]:
            out = feature.forward(original, bound, state)
            if out is not None:
                return out
        return self.run_forward(original, args, kwargs, state, tuple(sample.shape))

    def run_forward(self, original: Callable, args: tuple, kwargs: dict, state: BranchState, shape: tuple) -> Any:
        """Run the model under the plan for branch ``state`` on a sample of ``shape`` and count its MACs."""
        self._shape, self._batch = shape[1:], shape[0]
        # by name, however a feature passes them: a longer text conditioning costs more
        self.mac_key = (self._shape, condition_shapes(self._signature.bind(*args, **kwargs).arguments))
        batch = self._batch
        measure = self.mac_key not in self.unit_macs
        own = (shape[0] // state.tile, *shape[1:])  # parallel decoding runs several steps' batches as one
        if state.shape is not None and state.shape != own:
            state.forget()  # the resolution (bottleneck sampling) or the batch (a callback dropping guidance) changed
        state.shape = own
        for feature in self._hooks["before_forward"]:
            feature.before_forward(state)
        self._current = state
        state.computed = {}
        try:
            if measure:
                out = self._measured(original, args, kwargs)
            else:
                out = original(*args, **kwargs)
        finally:
            self._current = None
        self._check_finite(state, out)
        state.computed = {}  # let this forward's unit outputs go
        self.stats.forwards += 1
        total = self.unit_macs[self.mac_key][0] * batch
        self.stats.full_macs += total
        self.stats.macs += total
        return out

    def _measured(self, original, args, kwargs):
        """The first (all-compute) forward of a shape, under torch's FLOP counter, each unit under a
        nested counter of its own: the MACs of the model and of every unit."""
        self._measuring = [0] * (len(self.units) + 1)
        try:
            with FlopCounterMode(display=False) as counter:
                out = original(*args, **kwargs)
            self._measuring[0] = counter.get_total_flops()
            self.unit_macs[self.mac_key] = [f // 2 // self._batch for f in self._measuring]
        finally:
            self._measuring = None
        return out

    def _check_finite(self, state: BranchState, out: Any) -> None:
        if self.check_finite and not all_finite(out):
            raise non_finite_error(state, [u.name for u in self.units])

    # -- units ----------------------------------------------------------------------------------
    def _action(self, state: BranchState, index: int) -> str:
        action = self.plan.action(state.step, index)
        for feature in self._hooks["action"]:
            action = feature.action(state, index, action)
        return action

    def _unit_forward(self, index: int, original, args: tuple, kwargs: dict):
        state = self._current
        if state is None:  # the unit is called outside a tracked model forward
            return original(*args, **kwargs)
        unit = self.units[index]
        for feature in self._hooks["before_unit"]:
            feature.before_unit(state, index, unit, args, kwargs)
        cache = state.caches[index]
        action = self._action(state, index)
        if action == "C" or not cache.ready:
            return self._compute(index, original, args, kwargs, state, cache)
        self._charge_skipped(index)
        self.stats.reused += action == "R"
        self.stats.forecast += action == "F"
        if index in state.passthrough:
            return unit.residual_inputs(args, kwargs)
        if unit.residual_inputs is not None and self._merge and state.tile == 1:
            run = merged_run(state, self.units, index, action, lambda i: self._action(state, i))
            base = unit.residual_inputs(args, kwargs)
            if action == "R":
                return tree_map(lambda x, r: x + r, base, run.last())
            return run.forecast(state.step, self._order, base=base)
        value = cache.last() if action == "R" else cache.forecast(state.step, self._order)
        for feature in self._hooks["serve"]:
            value = feature.serve(value, state.step, index)
        if state.tile > 1:
            value = tree_map(lambda v: v.repeat(state.tile, *([1] * (v.dim() - 1))), value)
        if unit.residual_inputs is None:  # a copy: the model may change it in place (FreeU, T2I-Adapter residuals)
            return tree_map(torch.clone, value)
        return tree_map(lambda x, r: x + r, unit.residual_inputs(args, kwargs), value)

    def _compute(self, index, original, args, kwargs, state: BranchState, cache: UnitCache):
        unit = self.units[index]
        if self._measuring is not None:
            with FlopCounterMode(display=False) as counter:
                out = original(*args, **kwargs)
            self._measuring[index + 1] += counter.get_total_flops()
        else:
            out = original(*args, **kwargs)
        if index in self._stored:
            value = tree_map(torch.clone, out) if unit.residual_inputs is None else tree_map(
                lambda y, x: y - x, out, unit.residual_inputs(args, kwargs))
            if state.tile > 1:  # keep the first copy of a tiled (parallel-decoding) batch
                value = tree_map(lambda v: v[: v.shape[0] // state.tile], value)
            cache.store(state.step, value, self._keep)
        state.computed[index] = out
        self.stats.computed += 1
        for feature in self._hooks["after_compute"]:
            feature.after_compute(state, index, out)
        return out

    def _charge_skipped(self, index: int) -> None:
        table = self.unit_macs.get(self.mac_key)
        if table is not None:
            self.stats.macs -= table[index + 1] * self._batch

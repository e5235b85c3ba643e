"""A plan applied to a pipeline that serves requests: copies, shared schedulers, threads, components
replaced or wrapped by other libraries while the plan is applied, and what ``disable`` leaves."""

from __future__ import annotations

import copy
import functools
import threading

import pytest
import torch
from diffusers import EulerDiscreteScheduler

import diffaccel
from diffaccel import methods
from diffaccel.errors import PlanError
from diffaccel.runtime import PlanWarning
from diffaccel.solvers.spec import SolverSpec
from stock_pipelines import pixart

torch.set_num_threads(1)

HOOKS = ("step", "set_timesteps", "set_begin_index")


def run(pipe, call: dict, seed: int = 1, **extra) -> torch.Tensor:
    return pipe(**{**call, **extra}, generator=torch.Generator().manual_seed(seed), output_type="pt").images


def hooked(scheduler) -> list[str]:
    return [name for name in HOOKS if name in vars(scheduler)]


def wrapped(model: torch.nn.Module) -> bool:
    return any("forward" in vars(m) or "_diffaccel_executor" in vars(m) for m in model.modules())


@pytest.fixture
def served():
    """A pipeline, its call, a FORA plan for it and that plan's output on a pipeline of its own."""
    pipe, call = pixart()
    plan = methods.fora(pipe, 6, interval=2)
    reference, _ = pixart()
    with diffaccel.accelerate(reference, plan):
        expected = run(reference, call)
    return pipe, call, plan, expected


def test_deep_copying_a_pipeline_under_a_plan_is_refused_and_the_original_keeps_working(served):
    pipe, call, plan, expected = served
    diffaccel.enable(pipe, plan)
    with pytest.raises(PlanError, match="copy it before applying the plan or after removing it"):
        copy.deepcopy(pipe)  # had given a copy whose wrappers ran the original's model and scheduler
    with pytest.raises(PlanError, match="deep-copied"):
        copy.deepcopy(pipe.transformer)
    assert torch.equal(run(pipe, call), expected)
    diffaccel.disable(pipe)
    clone = copy.deepcopy(pipe)
    with torch.no_grad():
        for weight in clone.transformer.parameters():
            weight.zero_()
    assert not torch.equal(run(clone, call), run(pipe, call))


def test_a_plan_on_a_scheduler_another_plan_counts_is_refused_before_anything_changes(served):
    pipe, call, plan, expected = served
    other, _ = pixart()
    other.scheduler = pipe.scheduler
    diffaccel.enable(pipe, plan)
    with pytest.raises(PlanError, match="give each pipeline its own"):
        diffaccel.enable(other, methods.fora(other, 6, interval=3))
    assert not wrapped(other.transformer)
    assert torch.equal(run(pipe, call), expected)
    diffaccel.disable(pipe)
    assert not hooked(pipe.scheduler)
    other.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    with diffaccel.accelerate(other, plan):
        assert torch.equal(run(other, call), expected)


def test_a_call_from_a_second_thread_while_one_runs_is_refused_and_the_running_call_is_unharmed(served):
    pipe, call, plan, expected = served
    diffaccel.enable(pipe, plan)
    second: dict = {}

    def call_from_another_thread():
        try:
            second["out"] = run(pipe, call)
        except PlanError as exc:
            second["error"] = exc

    def at_step(step, timestep, latents):  # the first thread's call is running: a second one starts now
        if step == 2 and not second:
            thread = threading.Thread(target=call_from_another_thread)
            thread.start()
            thread.join()

    first = run(pipe, call, callback=at_step, callback_steps=1)
    assert "one call at a time" in str(second.get("error")), second
    assert torch.equal(first, expected)
    second.clear()  # one call after the other, from two threads: both run under the plan
    call_from_another_thread()
    thread = threading.Thread(target=call_from_another_thread)
    thread.start()
    thread.join()
    assert torch.equal(second["out"], expected)
    diffaccel.disable(pipe)


@pytest.mark.parametrize("way", ["from_pipe", "bare model"])
def test_a_second_thread_is_refused_while_a_call_runs_through_a_sibling_or_around_a_bare_model(served, way):
    """The guard looked for the running call in the frames of the pipeline the plan was applied to: a
    call through a ``from_pipe`` sibling, or any call around a plan on the bare model, let the second
    thread in (the first call then failed, or changed silently)."""
    pipe, call, plan, expected = served
    runner = type(pipe).from_pipe(pipe) if way == "from_pipe" else pipe
    target = pipe if way == "from_pipe" else pipe.transformer
    diffaccel.enable(target, plan)
    second: dict = {}

    def at_step(step, timestep, latents):
        if step == 2 and not second:
            def call_from_another_thread():
                try:
                    second["out"] = run(pipe, call)
                except PlanError as exc:
                    second["error"] = exc
            thread = threading.Thread(target=call_from_another_thread)
            thread.start()
            thread.join()

    try:
        first = run(runner, call, callback=at_step, callback_steps=1)
    finally:
        diffaccel.disable(target)
    assert "one call at a time" in str(second.get("error")), second
    assert torch.equal(first, expected)


def test_disable_removes_a_plan_whose_denoiser_was_replaced_and_calls_meanwhile_are_refused(served):
    pipe, call, plan, _ = served
    old, scheduler = pipe.transformer, pipe.scheduler
    diffaccel.enable(pipe, plan)
    pipe.transformer = pixart()[0].transformer
    with pytest.raises(PlanError, match="pipe.transformer was replaced"):
        run(pipe, call)  # had run without the plan, its stats still showing the earlier call's
    with pytest.raises(PlanError, match="disable"):
        diffaccel.enable(pipe, plan)
    diffaccel.disable(pipe)  # had left the old transformer and the scheduler patched
    assert not wrapped(old) and not hooked(scheduler)
    with diffaccel.accelerate(pipe, plan) as executor:
        run(pipe, call)
    assert executor.stats.reused > 0


def counting(calls: list, original):
    """A wrapper as another library sets one over an instance attribute (accelerate's offload hook)."""
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    return wrapper


def test_disable_leaves_a_wrapper_another_library_put_over_the_plans_and_it_passes_through(served):
    pipe, call, plan, _ = served
    plain = run(pipe, call)
    model, scheduler = pipe.transformer, pipe.scheduler
    diffaccel.enable(pipe, plan)
    forwards, steps = [], []
    model.forward = theirs = counting(forwards, model.forward)
    scheduler.step = their_step = counting(steps, scheduler.step)
    diffaccel.disable(pipe)  # had deleted both: the other library's hooks never ran again
    assert vars(model)["forward"] is theirs and vars(scheduler)["step"] is their_step
    assert torch.equal(run(pipe, call), plain)
    assert len(forwards) == len(steps) == 6


def test_a_pipeline_under_a_quantized_plan_refuses_to_save_and_its_layers_follow_a_dtype_change(tmp_path):
    pipe, call = pixart()
    plan = methods.ptq(pipe, [dict(call, seed=0)], bits="w8a8", backend="fake")
    diffaccel.enable(pipe, plan)
    with pytest.raises(PlanError, match="save the pipeline before applying the plan or after removing it"):
        pipe.save_pretrained(tmp_path)  # had saved the quantized layers: a reload gave NaN
    pipe.transformer.fuse_qkv_projections()
    pipe.to(torch.float64)
    with pytest.warns(PlanWarning, match="unfuse_qkv_projections"):  # had baked the rounded weights in silently
        diffaccel.disable(pipe)
    pipe.transformer.unfuse_qkv_projections()
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float64}  # had kept them float32
    assert run(pipe, call).dtype == torch.float64


def solver_plan(pipe):
    return methods.fora(pipe, 4, interval=2).model_copy(update={"solver": SolverSpec(name="unipc", steps=4)})


def test_a_solver_plans_scheduler_refuses_to_be_saved_and_stops_forcing_its_steps_once_removed(tmp_path):
    pipe, _ = pixart()
    own = pipe.scheduler
    diffaccel.enable(pipe, solver_plan(pipe))
    planned = pipe.scheduler  # what a pipeline made meanwhile (from_pipe) holds
    with pytest.raises(PlanError, match="save the pipeline before applying the plan or after removing it"):
        pipe.save_pretrained(tmp_path)  # had saved the plan's UniPC as the pipeline's scheduler
    diffaccel.disable(pipe)
    planned.save_pretrained(tmp_path / "scheduler")  # once the plan is removed, it is a scheduler like any
    assert pipe.scheduler is own and not hooked(planned)  # its step-count override had stayed
    planned.set_timesteps(6)
    assert len(planned.timesteps) == 6


def test_a_scheduler_set_under_a_solver_plan_is_kept_at_disable_and_said():
    pipe, _ = pixart()
    diffaccel.enable(pipe, solver_plan(pipe))
    mine = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = mine
    with pytest.warns(PlanWarning, match="pipe.scheduler was replaced"):
        diffaccel.disable(pipe)  # had put the earlier one back without a word
    assert pipe.scheduler is mine and not hooked(mine)

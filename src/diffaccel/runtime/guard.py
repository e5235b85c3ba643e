"""What keeps an applied plan from serving calls it cannot serve right: a call from a second thread
while another thread's call is running (the caches, step count and scheduler are the running call's),
a call after the pipeline's denoiser was replaced, a scheduler another plan already counts, and the
wrappers another library kept after the plan was removed (they pass calls through)."""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch

from diffaccel.errors import PlanError

NESTED = ("a plan is already applied to this model (plans do not nest): leave its `accelerate` block, or "
          "`diffaccel.disable` it, before applying another")
CONCURRENT = ("one pipeline under a plan runs one call at a time (its caches, step count and scheduler belong to "
              "the running call): give each thread its own pipeline (or hold a lock around each call)")
SHARED_SCHEDULER = ("this scheduler is already counted by a plan applied to another model (two pipelines share "
                    "one scheduler object): give each pipeline its own, e.g. pipe.scheduler = "
                    "type(pipe.scheduler).from_config(pipe.scheduler.config)")
REGISTRY = "_diffaccel_executors"  # on a pipeline: the executors applied to it, for ``disable``


class Guard:
    """Checked where a call enters an installed executor: the denoiser's forward, the scheduler's
    ``set_timesteps``, ``set_begin_index`` and ``step``."""

    def __init__(self, model: torch.nn.Module, pipe: Any) -> None:
        self.live = True  # False once the plan is removed: wrappers left in place pass calls through
        self.model, self.pipe = model, pipe
        self.component = next((name for name, value in components(pipe).items() if value is model), None)
        self.host = model if pipe is None else pipe  # a call in progress is a thread inside its methods
        self._thread: int | None = None  # the thread of the call the run state belongs to
        self._lock = threading.Lock()

    def enter(self) -> bool:
        """Whether the plan still applies (else the wrapper passes the call through); a call from a
        second thread while another thread's call is running is refused before it changes anything."""
        if not self.live:
            return False
        me = threading.get_ident()
        if self._thread != me:
            with self._lock:
                if self._thread is not None and self._thread != me and _calling(self._thread, self.host, self.model):
                    raise PlanError(CONCURRENT)
                self._thread = me
        return True

    def close(self, executor: Any) -> None:
        """The plan is being removed: the wrappers that stay pass calls through from now on."""
        self.live = False
        unregister(self.pipe, executor)

    def enter_scheduler(self) -> bool:
        """``enter``, and a call of a pipeline whose denoiser is no longer the one the plan runs on is refused."""
        if not self.enter():
            return False
        if self.component is not None and getattr(self.pipe, self.component, None) is not self.model:
            raise PlanError(replaced_denoiser(self.component))
        return True


def replaced_denoiser(component: str) -> str:
    return (f"pipe.{component} was replaced while a plan was applied to the one before (the plan does not run on the "
            f"new model): diffaccel.disable(pipe) before replacing it, then apply a plan made for the new one")


def _calling(thread: int, host: Any, model: torch.nn.Module) -> bool:
    """Whether ``thread`` is inside a method of ``host``, of ``model`` or of another object holding
    ``model`` (a pipeline made with ``from_pipe``, or any pipeline around a bare model under a plan):
    a call still running, not one that stopped mid-run (the next thread may start its own)."""
    frame = sys._current_frames().get(thread)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is host or owner is model or any(value is model for value in getattr(owner, "__dict__", {}).values()):
            return True
        frame = frame.f_back
    return False


def components(pipe: Any) -> dict[str, Any]:
    """A pipeline's named parts: diffusers' ``components``, else the object's attributes."""
    if pipe is None:
        return {}
    found = getattr(pipe, "components", None)
    return found if isinstance(found, dict) else vars(pipe)


def check_scheduler_free(scheduler: Any) -> None:
    """Refuse a scheduler whose steps a plan applied to another model counts already."""
    guard = getattr(getattr(scheduler, "step", None), "diffaccel_guard", None)
    if guard is not None and guard.live:
        raise PlanError(SHARED_SCHEDULER)


def applied(pipe: Any) -> list[Any]:
    """The executors installed on ``pipe`` (found even after its denoiser was replaced)."""
    return list(vars(pipe).get(REGISTRY, ())) if pipe is not None and hasattr(pipe, "__dict__") else []


def register(pipe: Any, executor: Any) -> None:
    if pipe is not None:
        setattr(pipe, REGISTRY, [*applied(pipe), executor])


def unregister(pipe: Any, executor: Any) -> None:
    left = [other for other in applied(pipe) if other is not executor]
    if left:
        setattr(pipe, REGISTRY, left)
    elif pipe is not None and REGISTRY in vars(pipe):
        delattr(pipe, REGISTRY)


def check_not_stale(pipe: Any) -> None:
    """Refuse a new plan on a pipeline that still holds one applied to a denoiser since replaced."""
    for executor in applied(pipe):
        component = executor.guard.component if executor.guard is not None else None
        if component is not None and getattr(pipe, component, None) is not executor.model:
            raise PlanError(replaced_denoiser(component))

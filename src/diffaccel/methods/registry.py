"""Methods by name, built from the ``Method`` record of each method module: for the CLI, the bench
and the search. ``build(name, pipe, num_steps, calls=..., **settings)`` makes any of them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from diffaccel.adapters import adapter_for, find_denoiser
from diffaccel.calibration.workload import Workload, calibration_workload
from diffaccel.errors import MethodError
from diffaccel.methods.base import Method, check_applies
from diffaccel.methods.deepcache import DEEPCACHE
from diffaccel.methods.erta import ERTA
from diffaccel.methods.faster_diffusion import FASTER_DIFFUSION
from diffaccel.methods.first_block_cache import DBCACHE, FIRST_BLOCK_CACHE
from diffaccel.methods.fora import FORA
from diffaccel.methods.keysteps import KEYSTEPS
from diffaccel.methods.ptq import PTQ
from diffaccel.methods.taylorseer import TAYLORSEER
from diffaccel.plan import Plan
from diffaccel.steps import model_evaluations

METHODS: dict[str, Method] = {m.name: m for m in (DEEPCACHE, FASTER_DIFFUSION, FORA, TAYLORSEER, FIRST_BLOCK_CACHE,
                                                  DBCACHE, ERTA, KEYSTEPS, PTQ)}


def method(name: str) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def parameters(name: str) -> dict[str, object]:
    """The settings of a method and their defaults."""
    return method(name).knobs()


def applicable(model: Any) -> list[str]:
    """The methods that apply to a model (or a pipeline's denoiser)."""
    adapter = adapter_for(find_denoiser(model)[0])
    return [name for name, m in METHODS.items() if m.applies(adapter)]


def build(name: str, pipe: Any, num_steps: int, guidance: float | None = None,
          calls: Workload | Iterable[dict] | None = None, **settings: Any) -> Plan:
    """A plan of method ``name`` for ``pipe`` at ``num_steps`` inference steps (for a scheduler that
    evaluates the model more often, PNDM or Heun say, the plan covers every evaluation).
    Calibrated methods run ``calls`` (by default the embedded pipelines' workload at these steps
    and ``guidance``). Unknown names or settings raise MethodError."""
    spec = method(name)
    model, scheduler = find_denoiser(pipe)
    check_applies(spec, model)
    s = spec.make_settings(**settings)
    if not spec.calibrated:
        return spec.build(model, model_evaluations(scheduler, num_steps), s)
    defaults = {"num_steps": num_steps} if guidance is None else {"num_steps": num_steps, "guidance": guidance}
    workload = calibration_workload(calls, pipe, **defaults)
    if spec.composes and getattr(s, "cache", None):
        inner = dict(s.cache)
        inner_name = inner.pop("method", None)
        inner.pop("correct", None)
        if not isinstance(inner_name, str) or method(inner_name).composes:
            raise MethodError(f"cache must name a caching method, as {{'method': 'keysteps', 'keys': 12}}; "
                              f"got {s.cache!r}")
        caching = build(inner_name, pipe, num_steps, guidance, workload, **inner)
        return spec.build(pipe, workload, s, caching)
    return spec.build(pipe, workload, s)

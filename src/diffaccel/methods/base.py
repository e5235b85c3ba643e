"""What a method is: a settings model (typed data) and one function that turns settings into a Plan.

Static methods (``fora``, ``deepcache``, ...) need only the denoiser and a step count; calibrated
methods (``keysteps``, ``erta``, ``ptq``) also run the pipeline on a calibration workload. The
registry (``registry.py``), the CLI options and ``diffaccel methods`` are all built from the
``Method`` records each method module declares.
"""

from __future__ import annotations

import numbers
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from diffaccel.adapters import Adapter, adapter_for, find_denoiser
from diffaccel.errors import MethodError
from diffaccel.plan import Plan


class Settings(BaseModel):
    """Base of every method's settings: unknown keys are errors, values are checked on creation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # the paper idea, in a few words
    settings: type[Settings]
    build: Callable[..., Plan]  # static: build(model, num_steps, settings); calibrated: build(pipe, workload, settings)
    calibrated: bool = False
    needs: frozenset[str] = frozenset()  # adapter capabilities the method needs
    defaults: dict[str, Any] | None = None  # overrides of the settings' defaults (a variant, e.g. dbcache)
    composes: bool = False  # its settings' ``cache`` names another method, whose plan it builds on
    step_free: bool = False  # a rule decides at run time: the plan holds no per-step rows

    def applies(self, adapter: Adapter) -> bool:
        return self.needs <= adapter.capabilities

    def make_settings(self, **values: Any) -> Settings:
        known = ", ".join(self.settings.model_fields)
        unknown = sorted(set(values) - set(self.settings.model_fields))
        if unknown:
            raise MethodError(f"{self.name} has no setting {', '.join(unknown)}; its settings are {known}")
        flags = [k for k, v in values.items() if isinstance(v, bool) and not _takes_bool(self.settings.model_fields[k])]
        if flags:  # pydantic would read True as 1
            raise MethodError(f"{self.name} settings: {', '.join(flags)} must be a number, not True or False")
        try:
            return self.settings(**{**(self.defaults or {}), **values})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or self.name}: {e['msg']}" for e in exc.errors())
            raise MethodError(f"{self.name} settings: {problems}") from None

    def knobs(self) -> dict[str, Any]:
        """The settings and their defaults."""
        fields = self.settings.model_fields
        return {name: (self.defaults or {}).get(name, field.default) for name, field in fields.items()}

    def make(self, target: Any, num_steps: int | None, **settings: Any) -> Plan:
        """A static method's plan for ``target``'s denoiser (a pipeline or the model itself)."""
        if num_steps is None and not self.step_free:
            raise MethodError(f"{self.name} makes a plan for a number of steps: give num_steps (denoiser evaluations)")
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral)):
            raise MethodError(f"num_steps must be a whole number (denoiser evaluations), got {num_steps!r}")
        return self.build(denoiser_of(target), num_steps, self.make_settings(**settings))


def _takes_bool(field: FieldInfo) -> bool:
    return field.annotation is bool or bool in typing.get_args(field.annotation)


def denoiser_of(target: Any) -> torch.nn.Module:
    """The denoiser of a pipeline (through the adapters), or the model itself."""
    return find_denoiser(target)[0]


WHY = {"skip-branches": "a U-Net's skip branches", "residual-chain": "a chain of residual transformer blocks",
       "parallel-decode": "a U-Net decoder"}


def check_applies(method: Method, model: torch.nn.Module) -> Adapter:
    adapter = adapter_for(model)
    if not method.applies(adapter):
        need = " and ".join(WHY.get(n, n) for n in sorted(method.needs - adapter.capabilities))
        raise MethodError(f"{method.name} does not apply to a {type(model).__name__}: it needs {need}")
    return adapter


def unit_names(model: torch.nn.Module, granularity: str = "block") -> list[str]:
    return adapter_for(model).unit_names(model, granularity)


def make_plan(model: torch.nn.Module, rows: list[str], method: str, params: dict, granularity: str = "block",
              **fields) -> Plan:
    return checked_plan(model, method, params, units=unit_names(model, granularity), granularity=granularity,
                        num_steps=len(rows), schedule=rows, **fields)


def checked_plan(model: torch.nn.Module, method: str, params: dict, **fields: Any) -> Plan:
    """A Plan for ``model``; settings that make no valid plan on it (a rule leaving no unit to skip on
    a three-block model, ...) are a MethodError that says why."""
    try:
        return Plan(adapter=adapter_for(model).name, model_class=type(model).__name__, method=method, params=params,
                    **fields)
    except ValidationError as exc:
        reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise MethodError(f"{method} with {params} makes no valid plan for this {type(model).__name__}: "
                          f"{reason}") from None


def key_steps_uniform(num_steps: int, interval: int, warmup: int = 1) -> set[int]:
    """Steps that compute everything: the first ``warmup`` steps, then every ``interval``-th."""
    if interval < 1:
        raise MethodError(f"interval must be >= 1, got {interval}")
    if num_steps < 1:
        raise MethodError(f"num_steps must be >= 1, got {num_steps}")
    warmup = max(1, warmup)
    return set(range(min(warmup, num_steps))) | set(range(warmup - 1, num_steps, interval))


def key_steps_early_dense(num_steps: int, interval: int, power: float = 1.6, count: int | None = None) -> set[int]:
    """About ``num_steps / interval`` key steps (or ``count``), spaced as ``(k/K)**power`` so that
    they crowd the start of sampling, where features move fastest (DeepCache's non-uniform schedule)."""
    if count is not None and not 2 <= count <= num_steps:
        raise MethodError(f"key_steps must lie in [2, {num_steps}], got {count}")
    count = count if count is not None else max(2, -(-num_steps // interval))
    keys = {round((k / (count - 1)) ** power * (num_steps - 1)) for k in range(count)}
    return keys | {0}


def rows_from(num_steps: int, units: list[str], keys: Iterable[int], skipped: set[str], action: str = "R",
              ) -> list[str]:
    """Schedule rows: all-compute at key steps, ``action`` for the ``skipped`` units elsewhere."""
    keys = set(keys)
    unknown = skipped - set(units)
    if unknown:
        raise MethodError(f"unknown units {sorted(unknown)}; the model has {units}")
    return ["C" * len(units) if s in keys else "".join(action if u in skipped else "C" for u in units)
            for s in range(num_steps)]

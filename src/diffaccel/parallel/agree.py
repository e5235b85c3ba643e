"""Ranks must run the same plan on the same weights with the same settings and calls: a rank that
loaded other weights, another plan file, another scheduler or other prompts would still run, and its
part of every batch would silently differ (or its exchanges fall out of step and hang).

Each rank digests what it holds (the plan's JSON, the denoiser's weights, the scheduler's class and
config, the pipeline's other models, the calls' every argument and seed, the run's settings) and
every rank sees every digest, so all of them stop with the same message naming the rank and the
parts that differ.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from diffaccel.calibration.workload import Call, stable_text
from diffaccel.fingerprint import fingerprint, public_config
from diffaccel.parallel.errors import ParallelError
from diffaccel.parallel.exchange import gather_objects
from diffaccel.parallel.group import Group
from diffaccel.plan import Plan

SAMPLED_VALUES = 4096  # per tensor of a pipeline's other models (text encoders, VAE): see sampled_fingerprint
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # in an object's repr: differs between processes


def digest(value: Any) -> str:
    """16 hex digits of a JSON-able value (sorted keys, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_digest(plan: Plan | None) -> str:
    return "none" if plan is None else digest(json.loads(plan.model_dump_json(exclude_none=True)))


def calls_digest(calls: Sequence[Call]) -> str:
    """Every call's arguments (prompts, steps, guidance, sizes; tensors by their bytes) and seeds."""
    return digest([[ADDRESS.sub("", stable_text(call.kwargs)), list(call.seeds)] for call in calls])


def sampled_fingerprint(module: torch.nn.Module) -> str:
    """Class, config and every tensor's name, shape, dtype and the sum of up to ``SAMPLED_VALUES``
    evenly spaced values: other weights change it, at a fraction of ``fingerprint``'s full sums (a
    T5 text encoder holds billions of weights)."""
    summary: list[Any] = [type(module).__name__, public_config(module)]
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if type(value) is not torch.Tensor or not value.numel() or value.is_meta:
                summary.append(f"{name}{type(value).__name__}{tuple(getattr(value, 'shape', ()))}")
                continue
            flat = value.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // SAMPLED_VALUES)]
            summary.append(f"{name}{tuple(value.shape)}{value.dtype}{float(sample.double().abs().sum()):.6e}")
    return digest(summary)


def pipeline_fingerprints(pipe: Any, denoiser: torch.nn.Module) -> dict[str, str]:
    """The scheduler (class and config) and each of ``pipe``'s other models by its name (text
    encoders, VAE); the denoiser is the ``weights`` digest."""
    scheduler = getattr(pipe, "scheduler", None)
    held = {"scheduler": f"{type(scheduler).__name__} {digest(public_config(scheduler))}"}
    components = getattr(pipe, "components", None)
    for name, component in sorted((components if isinstance(components, dict) else {}).items()):
        if isinstance(component, torch.nn.Module) and component is not denoiser:
            held[name] = f"{type(component).__name__} {sampled_fingerprint(component)}"
    return held


def fingerprints(model: torch.nn.Module, plan: Plan | None, settings: dict | None = None, pipe: Any = None,
                 calls: Sequence[Call] | None = None) -> dict[str, str]:
    """What this rank holds, in digests: the plan, the weights, the settings, and (when given) the
    pipeline's scheduler and other models and the calls."""
    held = {"plan": plan_digest(plan), "weights": fingerprint(model), "settings": digest(settings or {})}
    if pipe is not None:
        held.update(pipeline_fingerprints(pipe, model))
    if calls is not None:
        held["calls"] = calls_digest(calls)
    return held


def check_agreement(group: Group, model: torch.nn.Module, plan: Plan | None, settings: dict | None = None,
                    pipe: Any = None, calls: Sequence[Call] | None = None) -> None:
    """Raise ``ParallelError`` on every rank when any rank's plan, weights, settings (and, when given,
    scheduler, other models of ``pipe`` or calls) differ from rank 0's."""
    if group.world == 1:
        return
    everyone = gather_objects(fingerprints(model, plan, settings, pipe, calls), group)
    reference = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        differ = [key for key in dict.fromkeys([*reference, *theirs]) if theirs.get(key) != reference.get(key)]
        if differ:
            what = ", ".join(f"{key} {theirs.get(key, 'missing')} (rank 0: {reference.get(key, 'missing')})"
                             for key in differ)
            raise ParallelError(f"rank {rank} disagrees with rank 0 on the {' and the '.join(differ)}: {what}; "
                                "every rank must run the same command on the same files (weights, pipeline, "
                                "plan, prompts)")


def applied_plan(model: torch.nn.Module) -> Plan | None:
    """The plan an executor applies to ``model`` right now (``diffaccel.accelerate``), if any."""
    executor = getattr(model, "_diffaccel_executor", None)
    return executor.source_plan if executor is not None else None


class Installable(Protocol):
    group: Group

    def install(self) -> Any: ...

    def remove(self) -> None: ...


@contextmanager
def agreed_and_installed(wrapper: Installable, model: torch.nn.Module, pipe: Any = None) -> Iterator[None]:
    """Check that every rank holds the same weights, scheduler and other models of ``pipe`` (and plan,
    when one is applied first), then keep ``wrapper`` installed for the ``with`` block."""
    check_agreement(wrapper.group, model, applied_plan(model), pipe=pipe)
    wrapper.install()
    try:
        yield
    finally:
        wrapper.remove()

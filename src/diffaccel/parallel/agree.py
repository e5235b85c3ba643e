"""Ranks must run the same plan on the same weights with the same settings: a rank that loaded other
weights or another plan file would still run, and its half of every batch would silently differ.

Each rank digests what it holds (the plan's JSON, the weights' fingerprint, the run's settings)
and every rank sees every digest, so all of them stop with the same message naming the rank and
the part that differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from diffaccel.fingerprint import fingerprint
from diffaccel.parallel.errors import ParallelError
from diffaccel.parallel.exchange import gather_objects
from diffaccel.parallel.group import Group
from diffaccel.plan import Plan


def digest(value: Any) -> str:
    """16 hex digits of a JSON-able value (sorted keys, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_digest(plan: Plan | None) -> str:
    return "none" if plan is None else digest(json.loads(plan.model_dump_json(exclude_none=True)))


def fingerprints(model: torch.nn.Module, plan: Plan | None, settings: dict | None = None) -> dict[str, str]:
    """What this rank holds, in digests: the plan, the weights, the settings."""
    return {"plan": plan_digest(plan), "weights": fingerprint(model), "settings": digest(settings or {})}


def check_agreement(group: Group, model: torch.nn.Module, plan: Plan | None, settings: dict | None = None) -> None:
    """Raise ``ParallelError`` on every rank when any rank's plan, weights or settings differ from rank 0's."""
    if group.world == 1:
        return
    mine = fingerprints(model, plan, settings)
    everyone = gather_objects(mine, group)
    reference = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        differ = [key for key in reference if theirs.get(key) != reference[key]]
        if differ:
            what = ", ".join(f"{key} {theirs.get(key)} (rank 0: {reference[key]})" for key in differ)
            raise ParallelError(f"rank {rank} disagrees with rank 0 on the {' and the '.join(differ)}: {what}; "
                                "every rank must load the same weights and plan with the same command")


class Installable(Protocol):
    group: Group

    def install(self) -> None: ...

    def remove(self) -> None: ...


@contextmanager
def agreed_and_installed(wrapper: Installable, model: torch.nn.Module) -> Iterator[None]:
    """Check that every rank holds the same weights (and plan, when one is applied first), then keep
    ``wrapper`` installed for the ``with`` block."""
    executor = getattr(model, "_diffaccel_executor", None)
    check_agreement(wrapper.group, model, executor.source_plan if executor is not None else None)
    wrapper.install()
    try:
        yield
    finally:
        wrapper.remove()

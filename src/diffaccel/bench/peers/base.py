"""What a peer is, and what a worker gives it: the shared sampling context and fresh pipelines.

A peer is a small function ``open(ctx, settings) -> Candidate`` that runs inside a worker
subprocess (``diffaccel.bench.worker``): it takes a fresh copy of the pipeline, applies the peer's
own code to it as its users would, and returns a ``Candidate`` whose ``run(call)`` samples the same
call (prompts or class labels, seeds, steps, guidance) as the baseline.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from diffaccel.adapters import find_denoiser
from diffaccel.calibration.workload import Call, images_of


@dataclass
class Candidate:
    """One setting of one method, ready to sample: ``run(call) -> images in [0, 1]``."""

    run: Callable[[Call], torch.Tensor]
    close: Callable[[], None] = lambda: None
    notes: str = ""
    extra: Callable[[], dict] | None = None  # more row fields after the timed runs (e.g. executor stats)
    # MACs are counted on this run instead of ``run`` when torch's FLOP counter cannot see the
    # candidate's kernels (a library's own int8 ops): the same computation at full precision.
    count: Callable[[Call], torch.Tensor] | None = None


@dataclass
class Context:
    """What a worker gives a peer: the job's sampling settings, fresh pipelines and calibration calls."""

    model: str
    sampler: str
    steps: int
    guidance: float
    fresh_pipe: Callable[..., Any]  # fresh_pipe(sampler=None) -> a new pipeline with its own weights
    calib_calls: list[Call]
    embedded: bool = True  # one of our class-conditional pipelines (else a stock diffusers pipeline)
    shared: dict = field(default_factory=dict)  # per-group cache (e.g. MagCache's calibrated ratios)

    @staticmethod
    def sample(pipe: Any, call: Call, steps: int | None = None) -> torch.Tensor:
        kwargs = dict(call.kwargs) if steps is None else {**call.kwargs, "num_inference_steps": steps}
        with torch.no_grad():
            return images_of(pipe(**kwargs, generator=call.generators(), output_type="pt"))

    @staticmethod
    def denoiser(pipe: Any) -> torch.nn.Module:
        return find_denoiser(pipe)[0]


@dataclass
class PeerSpec:
    name: str
    title: str
    models: tuple[str, ...]  # the adapters (model kinds) it applies to
    package: str  # import name, checked before a worker is started
    requirement: str  # what to install
    knobs: dict[str, object]  # settings and their defaults
    open: Callable[[Context, dict], Candidate]
    url: str = ""
    # raises ValueError("<knob> must be ..., got ...") for settings out of the peer's range: checked
    # in the sweep before any worker starts, and again by ``settings`` where a worker opens the peer
    check: Callable[[dict], None] = lambda settings: None

    def available(self) -> str | None:
        """None if the peer's package is importable, else why not (one line)."""
        try:
            found = importlib.util.find_spec(self.package) is not None
        except ModuleNotFoundError:  # the parent of a dotted name is missing
            found = False
        if not found:
            return f"{self.requirement} is not installed (pip install 'diffaccel[peers]')"
        return None

    def version(self) -> str | None:
        dist = re.split(r"[=<>!~ ]", self.requirement)[0]
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    def settings(self, given: dict) -> dict:
        """The knobs' defaults with ``given`` over them, checked (ValueError saying what to change)."""
        settings = {**self.knobs, **given}
        self.check(settings)
        return settings


def at_least(settings: dict, low: int, *knobs: str) -> None:
    """Each of ``knobs`` is a number >= ``low`` (an interval of 0 divides by zero in the peers)."""
    for knob in knobs:
        value = settings[knob]
        if value is not None and not (isinstance(value, int | float) and value >= low):
            raise ValueError(f"{knob} must be a number >= {low}, got {value!r}")

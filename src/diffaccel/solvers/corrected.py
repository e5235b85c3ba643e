"""Fitted solver coefficients: each step of a few-step sampler, corrected by a linear combination of
what the step already has, with weights fitted to the reference trajectory.

A few-step solver's update is a fixed linear combination of its input sample and of the model's
data predictions so far, with coefficients derived for a smooth trajectory. On a given model the
best combination differs: learned-solver work (bespoke and PCA-corrected solvers, S4S) fits such
coefficients on a few trajectories instead of retraining. Here each step's output gets an added
``w . (sample, D_i, D_{i-1}, D_{i-2})``; the weights are scalars shared by every pixel and image, so a
dozen calibration images determine them well (``search/coefficients.py`` fits them by least
squares, step by step). All-zero weights give the plain solver back exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from diffaccel.solvers.paths import clean_estimate
from diffaccel.solvers.spec import HISTORY


class Fitter(Protocol):
    """What a fit plugs into ``Corrected`` in place of fixed weights."""

    def begin(self) -> None:
        """A pipeline call starts (``set_timesteps``)."""

    def weights(self, step: int, basis: list[torch.Tensor], prev: torch.Tensor,
                next_timestep: float | None) -> Sequence[float] | None:
        """The weights for ``step``, given its basis and the solver's own output, which lands at
        ``next_timestep`` (None: the last step, the clean sample)."""


def show_inner_step(wrapper: Any, *names: str) -> None:
    """Give ``wrapper``'s methods ``names`` (default ``step``) the wrapped scheduler's signatures:
    pipelines pass ``eta`` and ``generator`` only to a ``step`` whose signature names them, and Flux
    passes ``sigmas`` only to a ``set_timesteps`` that names them; ``(*args, **kwargs)`` does not."""
    for name in names or ("step",):
        method = functools.partial(getattr(type(wrapper), name), wrapper)
        setattr(wrapper, name, functools.wraps(getattr(wrapper.inner, name))(method))


class Corrected:
    """Wraps a scheduler: after each of its steps, adds ``sum_k w[i][k] * basis_k`` to its output,
    where ``basis`` is the step's input sample and its newest data predictions. ``weights`` is one
    row per step (``SolverSpec.coefficients``); a ``fitter`` supplies them instead while fitting.
    Everything else is the wrapped scheduler's."""

    def __init__(self, inner: Any, weights: Sequence[Sequence[float]] | None = None, fitter: Fitter | None = None):
        self.inner, self._rows, self._fitter = inner, weights, fitter
        self._index, self._history = 0, []
        show_inner_step(self, "step", "set_timesteps")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        self.inner.set_timesteps(*args, **kwargs)
        self._index, self._history = 0, []
        if self._fitter is not None:
            self._fitter.begin()

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
             **kwargs: Any) -> Any:
        i, self._index = self._index, self._index + 1
        self._history = [clean_estimate(self.inner, timestep, model_output, sample), *self._history][:HISTORY]
        out = self.inner.step(model_output, timestep, sample, *args, **{**kwargs, "return_dict": False})
        prev = out[0]
        basis = [sample, *self._history]
        if self._fitter is not None:
            timesteps = self.inner.timesteps
            following = float(timesteps[i + 1]) if i + 1 < len(timesteps) else None
            row = self._fitter.weights(i, basis, prev, following)
        else:
            row = self._rows[i] if self._rows is not None and i < len(self._rows) else None
        if row is not None and any(row):
            prev = prev + sum(w * b.to(prev.dtype) for w, b in zip(row, basis))
        return SchedulerOutput(prev_sample=prev) if kwargs.get("return_dict", True) else (prev, *out[1:])

"""Per-unit cache state: the last computed values and a short history for Taylor forecasts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from diffaccel.errors import CacheError


def tree_map(fn: Callable, *trees: Any) -> Any:
    """Apply ``fn`` leaf-wise to tensors in matching nested tuples/lists; None stays None."""
    first = trees[0]
    if isinstance(first, (tuple, list)):
        return type(first)(tree_map(fn, *parts) for parts in zip(*trees))
    if first is None:
        return None
    return fn(*trees)


def structure(tree: Any) -> Any:
    """The nesting of a value with None where it holds None (values of equal structure can be summed)."""
    if isinstance(tree, (tuple, list)):
        return tuple(structure(part) for part in tree)
    return None if tree is None else tuple(tree.shape)


def tree_leaves(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, (tuple, list)):
        return [leaf for part in tree for leaf in tree_leaves(part)]
    return [] if tree is None else [tree]


def all_finite(value: Any) -> bool:
    """Whether every floating-point tensor in ``value`` (a tensor, a nest of them, a model output) is finite."""
    leaves = tree_leaves(list(value.values()) if isinstance(value, dict) else value)
    leaves = [v for v in leaves if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return not leaves or bool(torch.stack([torch.isfinite(v).all() for v in leaves]).all())


def non_finite_error(state: Any, names: list[str]) -> CacheError:
    """What a forward whose output holds a NaN or infinity broke: the first non-finite unit it computed
    (one reduction over the output found it: a check per unit cost 5% of a small DiT's run)."""
    index = next((i for i, value in state.computed.items() if not all_finite(value)), None)
    where = "the model" if index is None else f"unit {names[index]}"
    return CacheError(f"{where} produced a non-finite value at step {state.step}: the model, its input (latents, "
                      "conditioning, a guidance scale too large for the dtype) or the plan's correction or scale "
                      "values are broken (NaN or infinity); the run was stopped")


def primary(tree: Any) -> torch.Tensor:
    """The image-stream tensor of a unit's value: itself, or the last element of a tuple."""
    while isinstance(tree, (tuple, list)):
        tree = tree[-1]
    return tree


@dataclass
class UnitCache:
    """What one unit computed at its last compute steps (newest last)."""

    steps: list[int] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    def store(self, step: int, value: Any, keep: int) -> None:
        self.steps.append(step)
        self.values.append(value)
        del self.steps[:-keep], self.values[:-keep]

    @property
    def ready(self) -> bool:
        return bool(self.values)

    def last(self) -> Any:
        return self.values[-1]

    def forecast(self, step: int, order: int, base: Any = None) -> Any:
        """Polynomial extrapolation through the last ``order + 1`` computed points (TaylorSeer: the
        finite differences of those points estimate the derivatives in the step index). Written in
        Lagrange form, one weighted sum of the cached tensors, which keeps forecasting cheap; with
        ``base`` (a residual unit's input) the sum starts from it, saving one pass over the tensors."""
        k = min(order, len(self.values) - 1)
        if k == 0:
            last = self.values[-1]
            return last if base is None else tree_map(lambda b, v: b + v, base, last)
        xs = self.steps[-(k + 1):]
        weights = []
        for j, xj in enumerate(xs):
            w = 1.0
            for m, xm in enumerate(xs):
                if m != j:
                    w *= (step - xm) / (xj - xm)
            weights.append(w)
        points = self.values[-(k + 1):]

        def combine(start: torch.Tensor | None, *leaves: torch.Tensor) -> torch.Tensor:
            out = leaves[0] * weights[0] if start is None else torch.add(start, leaves[0], alpha=weights[0])
            for w, leaf in zip(weights[1:], leaves[1:]):
                out.add_(leaf, alpha=w)
            return out

        if base is None:
            return tree_map(lambda *leaves: combine(None, *leaves), *points)
        return tree_map(combine, base, *points)

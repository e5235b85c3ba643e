"""Per-unit cache state: the last computed values and a short history for Taylor forecasts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def tree_map(fn: Callable, *trees: Any) -> Any:
    """Apply ``fn`` leaf-wise to tensors in matching nested tuples/lists; None stays None."""
    first = trees[0]
    if isinstance(first, (tuple, list)):
        return type(first)(tree_map(fn, *parts) for parts in zip(*trees))
    if first is None:
        return None
    return fn(*trees)


def tree_leaves(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, (tuple, list)):
        return [leaf for part in tree for leaf in tree_leaves(part)]
    return [] if tree is None else [tree]


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

    def forecast(self, step: int, order: int) -> Any:
        """Newton extrapolation through the last ``order + 1`` computed points (TaylorSeer): the
        divided differences estimate the derivatives of the unit's output in the step index."""
        k = min(order, len(self.values) - 1)
        if k == 0:
            return self.values[-1]
        xs = self.steps[-(k + 1):]
        ys = self.values[-(k + 1):]
        # divided-difference table, built in place: coef[i] = f[x_0..x_i]
        coef = list(ys)
        for level in range(1, k + 1):
            for i in range(k, level - 1, -1):
                span = xs[i] - xs[i - level]
                coef[i] = tree_map(lambda a, b, s=span: (a - b) / s, coef[i], coef[i - 1])
        result = coef[k]
        for i in range(k - 1, -1, -1):
            result = tree_map(lambda r, c, d=step - xs[i]: c + r * d, result, coef[i])
        return result

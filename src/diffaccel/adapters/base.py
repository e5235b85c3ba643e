"""What an adapter is: the map from a concrete network to an ordered list of cacheable units.

A unit is a module whose output the executor may compute, reuse or forecast. A *residual* unit
caches ``output - input`` and, when reused, adds that to its current input (transformer blocks);
an *output* unit caches its output as is (components, U-Net blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Unit:
    name: str
    module: torch.nn.Module
    # For residual units: picks, from the module's call arguments, the input(s) that line up with
    # its output (same nesting; None where an output has no matching input).
    residual_inputs: Callable[[tuple, dict], Any] | None = None
    role: str = "block"  # "encoder" / "decoder" for U-Nets, "block" / "component" for transformers


def hidden_states_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """Input of a block called as ``block(hidden_states, ...)``."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def joint_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of a two-stream block returning ``(encoder_hidden_states, hidden_states)``."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    context = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    return context, hidden


@dataclass
class Adapter:
    """Subclasses fill in ``name``, ``model_classes`` and ``units``."""

    name: str = ""
    model_classes: tuple[str, ...] = ()
    granularities: tuple[str, ...] = ("block",)
    supports_parallel_decode: bool = False
    sample_arg: str = "hidden_states"
    timestep_arg: str = "timestep"
    extra: dict = field(default_factory=dict)

    def units(self, model: torch.nn.Module, granularity: str = "block") -> list[Unit]:
        raise NotImplementedError

    def check_granularity(self, granularity: str) -> None:
        if granularity not in self.granularities:
            raise ValueError(f"the {self.name} adapter offers granularity {', '.join(self.granularities)}, "
                             f"not {granularity!r}")


def block_units(prefix: str, blocks: torch.nn.ModuleList, residual_inputs, components: tuple[str, ...] | None
                ) -> list[Unit]:
    """Units of a list of transformer blocks: whole residual blocks, or their named components."""
    if components is None:
        return [Unit(f"{prefix}.{i}", block, residual_inputs, "block") for i, block in enumerate(blocks)]
    units = []
    for i, block in enumerate(blocks):
        for part in components:
            module = getattr(block, part, None)
            if isinstance(module, torch.nn.Module):
                units.append(Unit(f"{prefix}.{i}.{part}", module, None, "component"))
    return units

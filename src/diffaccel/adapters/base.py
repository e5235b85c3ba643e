"""What an adapter is: the map from a concrete network to an ordered list of cacheable units.

A unit is a module whose output the executor may compute, reuse or forecast. A *residual* unit
caches ``output - input`` and, when reused, adds that to its current input (transformer blocks);
an *output* unit caches its output as is (components, U-Net blocks).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffaccel.errors import MethodError, UnsupportedModelError


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


@dataclass(frozen=True)
class Level:
    """A named set of units reused together at a step (the search space's and keysteps' choices)."""

    name: str
    reused: frozenset[str]


@dataclass
class Adapter:
    """Subclasses fill in ``name``, ``model_classes``, ``units`` and the reuse structure."""

    name: str = ""
    model_classes: tuple[str, ...] = ()
    granularities: tuple[str, ...] = ("block",)
    # what the architecture offers methods: "residual-chain" (units are residual blocks in a chain:
    # the dynamic rule), "skip-branches" (a U-Net's skip structure: DeepCache, encoder propagation),
    # "parallel-decode" (decoder-only steps can run batched), "any-resolution" (the model runs at
    # other latent sizes mid-run: bottleneck sampling), "flow-matching" (trained on a flow path: the
    # solvers of solvers/flow.py, no betas-schedule sampler such as EVODiff)
    capabilities: frozenset[str] = frozenset()
    channel_axis: int = -1  # channel axis of cached unit outputs (per-channel corrections)
    sample_arg: str = "hidden_states"
    timestep_arg: str = "timestep"

    def check_arguments(self, model: torch.nn.Module) -> None:
        """``sample_arg`` and ``timestep_arg`` must name arguments of the model's forward: the executor
        reads a call's sample and timestep by these names."""
        parameters = inspect.signature(model.forward).parameters
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return
        for field in ("sample_arg", "timestep_arg"):
            if getattr(self, field) not in parameters:
                raise UnsupportedModelError(
                    f"the {self.name!r} adapter's {field} is {getattr(self, field)!r}, which "
                    f"{type(model).__name__}.forward does not take (its arguments: {', '.join(parameters)}): "
                    f"set {field} to the name of its {'noisy input' if field == 'sample_arg' else 'timestep'}")

    def units(self, model: torch.nn.Module, granularity: str = "block") -> list[Unit]:
        raise NotImplementedError

    def unit_names(self, model: torch.nn.Module, granularity: str = "block") -> list[str]:
        return [u.name for u in self.units(model, granularity)]

    def levels(self, model: torch.nn.Module, granularity: str = "block") -> list[Level]:
        """``C`` (reuse nothing), then the structured unit sets worth reusing, cheapest last."""
        raise NotImplementedError

    def default_reused(self, model: torch.nn.Module, granularity: str = "block",
                       components: tuple[str, ...] | None = None) -> set[str]:
        """The units static block caching (FORA) reuses by default."""
        raise NotImplementedError

    def size_multiple(self, model: torch.nn.Module) -> int:
        """The latent sizes ``model`` runs at are multiples of this (a transformer's patch size; of a video
        model's ``(frames, height, width)`` patch, the spatial one)."""
        size = getattr(getattr(model, "config", None), "patch_size", None) or 1
        return int(max(size[-2:]) if isinstance(size, (tuple, list)) else size)

    def check_granularity(self, granularity: str) -> None:
        if granularity not in self.granularities:
            raise MethodError(f"the {self.name} adapter offers granularity {', '.join(self.granularities)}, "
                             f"not {granularity!r}")


def unique_levels(levels: list[Level]) -> list[Level]:
    """Tiny models can make two levels the same set: keep the first of each."""
    unique: dict[frozenset, Level] = {}
    for level in levels:
        unique.setdefault(level.reused, level)
    return list(unique.values())


@dataclass(frozen=True)
class BlockList:
    """One ``nn.ModuleList`` of transformer blocks: where it is, what its units are called, which
    components can be cached on their own, and how a block's residual inputs are found."""

    prefix: str
    attribute: str
    components: tuple[str, ...]
    inputs: Callable[[torch.nn.Module], Callable[[tuple, dict], Any]] = lambda block: hidden_states_input


@dataclass
class TransformerAdapter(Adapter):
    """Transformers are chains of residual blocks: block units, or component units per block."""

    granularities: tuple[str, ...] = ("block", "component")
    capabilities: frozenset[str] = frozenset({"residual-chain", "any-resolution"})
    block_lists: tuple[BlockList, ...] = ()

    def levels(self, model: torch.nn.Module, granularity: str = "block") -> list[Level]:
        """``mid`` (all but the first and last unit: dual-block caching), ``tail`` (all but the first:
        first-block caching), ``all`` (FORA / TaylorSeer)."""
        units = self.unit_names(model, granularity)
        levels = [Level("C", frozenset())]
        if len(units) >= 3:
            levels.append(Level("mid", frozenset(units[1:-1])))
        if len(units) >= 2:
            levels.append(Level("tail", frozenset(units[1:])))
        levels.append(Level("all", frozenset(units)))
        return unique_levels(levels)

    def default_reused(self, model: torch.nn.Module, granularity: str = "block",
                       components: tuple[str, ...] | None = None) -> set[str]:
        units = self.unit_names(model, granularity)
        if granularity == "component" and components:
            return {u for u in units if u.rsplit(".", 1)[-1] in components}
        return set(units)

    def units(self, model: torch.nn.Module, granularity: str = "block") -> list[Unit]:
        self.check_granularity(granularity)
        units = []
        for blocks in self.block_lists:
            for i, block in enumerate(getattr(model, blocks.attribute)):
                if granularity == "block":
                    units.append(Unit(f"{blocks.prefix}.{i}", block, blocks.inputs(block), "block"))
                    continue
                for part in blocks.components:
                    module = getattr(block, part, None)
                    if isinstance(module, torch.nn.Module):
                        units.append(Unit(f"{blocks.prefix}.{i}.{part}", module, None, "component"))
        return units

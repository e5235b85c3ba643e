"""Adapter for diffusers ``UNet2DConditionModel`` (the embedded U-Net is one).

Units, in call order: ``conv_in``, ``down.i``, ``mid``, ``up.j``; the first three kinds form the
encoder. Reusing a down block returns its cached ``(hidden, skip features)``; reusing an up block
returns its cached output. DeepCache at branch ``b`` reuses every unit below skip branch ``b``
(``down.i`` for i > b, ``mid``, ``up.j`` for j < n-1-b); Faster Diffusion reuses the encoder.
Because a decoder-only step never reads its input latent, consecutive such steps can run as one
batch (parallel decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffaccel.adapters.base import Adapter, Level, Unit, unique_levels
from diffaccel.errors import MethodError


@dataclass
class UNetAdapter(Adapter):
    name: str = "unet"
    model_classes: tuple[str, ...] = ("UNet2DConditionModel",)
    capabilities: frozenset[str] = frozenset({"skip-branches", "parallel-decode"})
    channel_axis: int = 1
    sample_arg: str = "sample"

    def units(self, model: torch.nn.Module, granularity: str = "block") -> list[Unit]:
        self.check_granularity(granularity)
        units = [Unit("conv_in", model.conv_in, None, "encoder")]
        units += [Unit(f"down.{i}", block, None, "encoder") for i, block in enumerate(model.down_blocks)]
        if model.mid_block is not None:
            units.append(Unit("mid", model.mid_block, None, "encoder"))
        units += [Unit(f"up.{j}", block, None, "decoder") for j, block in enumerate(model.up_blocks)]
        return units

    def levels(self, model: torch.nn.Module, granularity: str = "block") -> list[Level]:
        """``deep1`` / ``deep0`` (DeepCache at skip branch 1 / 0), ``enc`` (the encoder: Faster
        Diffusion's encoder propagation), ``all``."""
        units = self.unit_names(model, granularity)
        num_levels = len(model.down_blocks)
        levels = [Level("C", frozenset())]
        for branch in (1, 0):
            if branch <= num_levels - 2:
                levels.append(Level(f"deep{branch}", frozenset(deep_units(num_levels, branch))))
        levels.append(Level("enc", frozenset(encoder_units(units))))
        levels.append(Level("all", frozenset(units)))
        return unique_levels(levels)

    def default_reused(self, model: torch.nn.Module, granularity: str = "block",
                       components: tuple[str, ...] | None = None) -> set[str]:
        return deep_units(len(model.down_blocks), 0)  # everything but the shallowest path


def encoder_units(units: list[str]) -> set[str]:
    """conv_in, the down blocks and the mid block."""
    return {u for u in units if u == "conv_in" or u.startswith("down.") or u == "mid"}


def deep_units(num_levels: int, branch: int) -> set[str]:
    """Units below skip branch ``branch`` (0 = shallowest), reused by DeepCache at that branch."""
    if not 0 <= branch < num_levels - 1:
        raise MethodError(f"branch must lie in [0, {num_levels - 2}] for a U-Net with {num_levels} levels")
    return ({f"down.{i}" for i in range(branch + 1, num_levels)} | {"mid"}
            | {f"up.{j}" for j in range(num_levels - 1 - branch)})

"""Adapter for diffusers ``FluxTransformer2DModel``: double-stream blocks, then single-stream
blocks; both return ``(text, image)`` pairs, so both are residual units over the pair."""

from __future__ import annotations

from dataclasses import dataclass

from diffaccel.adapters.base import BlockList, TransformerAdapter, joint_inputs


def _joint(block):
    return joint_inputs


@dataclass
class FluxAdapter(TransformerAdapter):
    name: str = "flux"
    model_classes: tuple[str, ...] = ("FluxTransformer2DModel",)
    capabilities: frozenset[str] = TransformerAdapter.capabilities | {"flow-matching"}
    block_lists: tuple[BlockList, ...] = (
        BlockList("double", "transformer_blocks", ("attn", "ff", "ff_context"), _joint),
        BlockList("single", "single_transformer_blocks", ("attn", "proj_mlp"), _joint),
    )

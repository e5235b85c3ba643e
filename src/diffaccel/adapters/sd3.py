"""Adapter for diffusers ``SD3Transformer2DModel``: joint blocks carry a text and an image stream,
so a block's residual is a pair ``(text, image)``; the last block (``context_pre_only``) returns
``(None, image)`` and so has an image residual only."""

from __future__ import annotations

from dataclasses import dataclass

from diffaccel.adapters.base import BlockList, TransformerAdapter, hidden_states_input, joint_inputs


def image_only_inputs(args: tuple, kwargs: dict) -> tuple[None, object]:
    return None, hidden_states_input(args, kwargs)


def _inputs(block):
    return image_only_inputs if getattr(block, "context_pre_only", False) else joint_inputs


@dataclass
class SD3Adapter(TransformerAdapter):
    name: str = "sd3"
    model_classes: tuple[str, ...] = ("SD3Transformer2DModel",)
    capabilities: frozenset[str] = TransformerAdapter.capabilities | {"flow-matching"}
    block_lists: tuple[BlockList, ...] = (
        BlockList("blocks", "transformer_blocks", ("attn", "ff", "ff_context"), _inputs),)

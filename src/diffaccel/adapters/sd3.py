"""Adapter for diffusers ``SD3Transformer2DModel``: joint blocks carry a text and an image stream,
so a block's residual is a pair ``(text, image)``; the last block may drop the text stream."""

from __future__ import annotations

from dataclasses import dataclass

from diffaccel.adapters.base import Adapter, block_units, joint_inputs


@dataclass
class SD3Adapter(Adapter):
    name: str = "sd3"
    model_classes: tuple[str, ...] = ("SD3Transformer2DModel",)
    granularities: tuple[str, ...] = ("block", "component")

    def units(self, model, granularity="block"):
        self.check_granularity(granularity)
        parts = None if granularity == "block" else ("attn", "ff", "ff_context")
        return block_units("blocks", model.transformer_blocks, joint_inputs, parts)

"""Adapter for diffusers ``PixArtTransformer2DModel`` (self-attention, cross-attention to text, FFN)."""

from __future__ import annotations

from dataclasses import dataclass

from diffaccel.adapters.base import Adapter, block_units, hidden_states_input


@dataclass
class PixArtAdapter(Adapter):
    name: str = "pixart"
    model_classes: tuple[str, ...] = ("PixArtTransformer2DModel",)
    granularities: tuple[str, ...] = ("block", "component")

    def units(self, model, granularity="block"):
        self.check_granularity(granularity)
        parts = None if granularity == "block" else ("attn1", "attn2", "ff")
        return block_units("blocks", model.transformer_blocks, hidden_states_input, parts)

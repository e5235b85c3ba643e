"""Adapter for diffusers ``DiTTransformer2DModel`` (the embedded DiT is one)."""

from __future__ import annotations

from dataclasses import dataclass

from diffaccel.adapters.base import Adapter, block_units, hidden_states_input


@dataclass
class DiTAdapter(Adapter):
    name: str = "dit"
    model_classes: tuple[str, ...] = ("DiTTransformer2DModel",)
    granularities: tuple[str, ...] = ("block", "component")

    def units(self, model, granularity="block"):
        self.check_granularity(granularity)
        parts = None if granularity == "block" else ("attn1", "ff")
        return block_units("blocks", model.transformer_blocks, hidden_states_input, parts)

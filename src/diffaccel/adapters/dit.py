"""Adapter for diffusers ``DiTTransformer2DModel`` (the embedded DiT is one)."""

from __future__ import annotations

from dataclasses import dataclass

from diffaccel.adapters.base import BlockList, TransformerAdapter


@dataclass
class DiTAdapter(TransformerAdapter):
    name: str = "dit"
    model_classes: tuple[str, ...] = ("DiTTransformer2DModel",)
    block_lists: tuple[BlockList, ...] = (BlockList("blocks", "transformer_blocks", ("attn1", "ff")),)

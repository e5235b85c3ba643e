"""Adapter for diffusers ``PixArtTransformer2DModel``: blocks with self-attention, cross-attention
to the text and a feed-forward network, each cacheable on its own."""

from __future__ import annotations

from dataclasses import dataclass

from diffaccel.adapters.base import BlockList, TransformerAdapter


@dataclass
class PixArtAdapter(TransformerAdapter):
    name: str = "pixart"
    model_classes: tuple[str, ...] = ("PixArtTransformer2DModel",)
    block_lists: tuple[BlockList, ...] = (BlockList("blocks", "transformer_blocks", ("attn1", "attn2", "ff")),)

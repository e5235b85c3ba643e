"""Adapter for diffusers ``FluxTransformer2DModel``: double-stream blocks, then single-stream
blocks; both return ``(text, image)`` pairs, so both are residual units over the pair."""

from __future__ import annotations

from dataclasses import dataclass

from diffaccel.adapters.base import Adapter, block_units, joint_inputs


@dataclass
class FluxAdapter(Adapter):
    name: str = "flux"
    model_classes: tuple[str, ...] = ("FluxTransformer2DModel",)
    granularities: tuple[str, ...] = ("block", "component")

    def units(self, model, granularity="block"):
        self.check_granularity(granularity)
        double = None if granularity == "block" else ("attn", "ff", "ff_context")
        single = None if granularity == "block" else ("attn", "proj_mlp")
        return (block_units("double", model.transformer_blocks, joint_inputs, double)
                + block_units("single", model.single_transformer_blocks, joint_inputs, single))

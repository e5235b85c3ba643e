"""Adapter for diffusers ``SD3Transformer2DModel``: joint blocks carry a text and an image stream,
so a block's residual is a pair ``(text, image)``; the last block may drop the text stream."""

from __future__ import annotations

from dataclasses import dataclass

from diffaccel.adapters.base import Adapter, Unit, block_units, hidden_states_input, joint_inputs


def image_only_inputs(args: tuple, kwargs: dict) -> tuple[None, object]:
    """Inputs of a ``context_pre_only`` block, which returns ``(None, hidden_states)``: its text
    stream has no output, so only the image stream carries a residual."""
    return None, hidden_states_input(args, kwargs)


@dataclass
class SD3Adapter(Adapter):
    name: str = "sd3"
    model_classes: tuple[str, ...] = ("SD3Transformer2DModel",)
    granularities: tuple[str, ...] = ("block", "component")

    def units(self, model, granularity="block"):
        self.check_granularity(granularity)
        if granularity == "component":
            return block_units("blocks", model.transformer_blocks, joint_inputs, ("attn", "ff", "ff_context"))
        return [Unit(f"blocks.{i}", block,
                     image_only_inputs if getattr(block, "context_pre_only", False) else joint_inputs, "block")
                for i, block in enumerate(model.transformer_blocks)]

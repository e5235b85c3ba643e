"""The quantization section of a plan: which layers run at which bit width, and on which path.

Pure data (no torch), so a plan file can be read and validated without loading a model.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffaccel.plan_files import json_types

FULL_PRECISION = 32  # an override to this width keeps a layer in floating point


def parse_bits(bits: str) -> tuple[int, int]:
    """``"w8a8"`` -> (8, 8): weight and activation bits."""
    match = re.fullmatch(r"[wW](\d+)[aA](\d+)", str(bits).strip())
    if not match:
        raise ValueError(f"bits must look like w8a8 or w4a8, got {bits!r}")
    weight, act = int(match[1]), int(match[2])
    if not (2 <= weight <= 8 and 4 <= act <= 8):
        raise ValueError(f"bits {bits!r}: weights take 2 to 8 bits and activations 4 to 8 (e.g. w8a8, w4a8)")
    return weight, act


class QuantSpec(BaseModel):
    """``W{weight_bits}A{act_bits}`` post-training quantization of a denoiser's Linear and Conv2d
    layers, with activation ranges calibrated over whole sampling trajectories (``calibration``).

    ``backend``: ``fake`` simulates the integers in floating point (any bit width, quality studies);
    ``int8`` runs Linear layers as real int8 x int8 matrix products with the calibrated activation
    scales (``torch._int_mm``, CPU or CUDA); ``int8-dynamic`` runs them through fbgemm's fused
    dynamic-activation kernel (CPU; the activation range is measured on each call, 7-bit unsigned as
    fbgemm requires), the fastest path on a CPU. Both int8 paths are W8A8 only; convolutions stay
    simulated on them."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    _json_types = model_validator(mode="before")(json_types)

    weight_bits: int = Field(8, ge=2, le=8)
    act_bits: int = Field(8, ge=4, le=8)
    backend: Literal["fake", "int8", "int8-dynamic"] = "fake"
    per_step: bool = Field(False, description="one activation scale per denoising step (else one per trajectory)")
    split_shortcut: bool = Field(True, description="U-Net: separate scales for the two halves of a skip concat")
    overrides: dict[str, int] = Field(
        default_factory=dict,
        description="layer-name pattern (fnmatch) -> weight bits; 32 keeps the layer in floating point")
    calibration: str = Field(description="safetensors file of calibrated activation ranges")

    @model_validator(mode="after")
    def _check(self) -> QuantSpec:
        if self.backend != "fake" and (self.weight_bits, self.act_bits) != (8, 8):
            raise ValueError(f"the {self.backend} backend runs W8A8 only, not W{self.weight_bits}A{self.act_bits}; "
                             "use backend 'fake' for other bit widths")
        for pattern, bits in self.overrides.items():
            if bits != FULL_PRECISION and not 2 <= bits <= 8:
                raise ValueError(f"override {pattern!r}: weight bits must lie in 2..8, or be "
                                 f"{FULL_PRECISION} to keep the layer in floating point (got {bits})")
            if self.backend != "fake" and bits not in (8, FULL_PRECISION):  # had run simulated under the label
                raise ValueError(f"override {pattern!r}: the {self.backend} backend runs 8-bit weights only (or "
                                 f"{FULL_PRECISION}, floating point), not {bits}; use backend 'fake' for other widths")
        return self

    @property
    def label(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}"

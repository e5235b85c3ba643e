"""Timestep-aware calibration (PTQ4DM / Q-Diffusion): the input range of every Linear and Conv2d
layer, recorded at every step of whole sampling trajectories (``calibration.record``), and saved
as safetensors.

Ranges drift along the trajectory, so a range taken at one timestep clips others; we keep one
range per step (for ``per_step`` plans) and their maximum (the trajectory-wide range). In a U-Net's
up blocks a ResNet's input is ``cat(upsampled features, skip features)``, two very different
ranges; those layers get one range per half ("split shortcut").
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffaccel.errors import QuantError
from diffaccel.fingerprint import fingerprint

FORMAT = "diffaccel-calibration/1"


def quantizable(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv2d layer of the model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def shortcut_splits(model: torch.nn.Module) -> dict[str, int]:
    """Layers of a U-Net's up blocks whose input is a skip concatenation -> channels of its first part.

    diffusers' up blocks concatenate ``[hidden, skip]`` before each ResNet; ResNet ``j`` receives the
    previous ResNet's output (``j > 0``) or the block input (``j == 0``), whose width is the
    previous up block's output width (the mid block's for the first).
    """
    splits: dict[str, int] = {}
    up_blocks = getattr(model, "up_blocks", None)
    if up_blocks is None:
        return splits
    widths = list(reversed(model.config.block_out_channels))
    for b, block in enumerate(up_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", [])):
            hidden = block.resnets[j - 1].out_channels if j > 0 else widths[max(b - 1, 0)]
            if 0 < hidden < resnet.in_channels:
                splits[f"up_blocks.{b}.resnets.{j}.conv1"] = hidden
                if resnet.conv_shortcut is not None:
                    splits[f"up_blocks.{b}.resnets.{j}.conv_shortcut"] = hidden
    return splits


@dataclass
class Calibration:
    """Per-layer input ranges ``[steps + 1, groups]`` (last row: the whole trajectory)."""

    model_class: str
    fingerprint: str
    act_bits: int
    num_steps: int
    absmax: dict[str, torch.Tensor]
    splits: dict[str, int] = field(default_factory=dict)
    workload: str = ""  # what it was calibrated on (calls, seeds, the pipeline's other parts), as a key; "" unknown

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {"format": FORMAT, "model_class": self.model_class, "fingerprint": self.fingerprint,
                "act_bits": str(self.act_bits), "num_steps": str(self.num_steps), "splits": json.dumps(self.splits),
                "workload": self.workload}
        # a temporary name of its own for each writer (ranks may save the same file), renamed over it whole
        handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(handle)
        try:
            save_file({name: t.contiguous() for name, t in self.absmax.items()}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        if path.is_dir():
            raise QuantError(f"calibration file {path} is a folder: name the .safetensors file in it")
        if not path.is_file():
            raise QuantError(f"calibration file {path} does not exist: run `diffaccel quantize` to make it")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                absmax = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:  # safetensors raises several types for damaged files
            raise QuantError(f"calibration file {path} is not a readable safetensors file: {exc}") from None
        if meta.get("format") != FORMAT:
            raise QuantError(f"{path} is not a diffaccel calibration file (format {meta.get('format')!r})")
        return cls(meta["model_class"], meta["fingerprint"], int(meta["act_bits"]), int(meta["num_steps"]),
                   absmax, {k: int(v) for k, v in json.loads(meta.get("splits", "{}")).items()},
                   meta.get("workload", ""))

    def check(self, model: torch.nn.Module, act_bits: int) -> None:
        """Raise QuantError unless this calibration was made for this model and bit width and holds
        usable ranges."""
        if self.model_class != type(model).__name__ or self.fingerprint != fingerprint(model):
            raise QuantError(f"this calibration was made for another model ({self.model_class}, fingerprint "
                             f"{self.fingerprint}); calibrate this {type(model).__name__} with `diffaccel quantize`")
        if self.act_bits != act_bits:
            raise QuantError(f"this calibration is for {self.act_bits}-bit activations, the plan asks for "
                             f"{act_bits}: calibrate again at A{act_bits}")
        for name, ranges in self.absmax.items():
            if ranges.dim() != 2 or len(ranges) != self.num_steps + 1:
                raise QuantError(f"calibrated ranges of {name} have shape {tuple(ranges.shape)}, not one row per step "
                                 f"and one for the whole run ({self.num_steps + 1}, groups): the file is damaged; "
                                 "calibrate again with `diffaccel quantize`")
            if not torch.isfinite(ranges).all():
                raise QuantError(f"calibrated range of {name} is not finite: the calibration runs diverged; "
                                 "calibrate with other inputs or fewer guidance")
            if not (ranges[-1] > 0).all():
                raise QuantError(f"calibrated range of {name} is zero: the calibration inputs never reach "
                                 "this layer; use more varied calibration inputs")
            if not (ranges > 0).all():
                step = int((ranges <= 0).any(dim=1).nonzero()[0])
                raise QuantError(f"calibrated range of {name} is zero at step {step}: a per-step scale of zero cannot "
                                 "quantize; calibrate again with `diffaccel quantize` (more varied inputs)")

"""Timestep-aware calibration (PTQ4DM / Q-Diffusion): the input range of every Linear and Conv2d
layer, recorded at every step of whole sampling trajectories, and saved as safetensors.

Ranges drift along the trajectory, so a range taken at one timestep clips others; we keep one
range per step (for ``per_step`` plans) and their maximum (the trajectory-wide range). In a U-Net's
up blocks a ResNet's input is ``cat(upsampled features, skip features)``, two very different
ranges; those layers get one range per half ("split shortcut").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from diffaccel.errors import DiffaccelError

FORMAT = "diffaccel-calibration/1"


class QuantError(DiffaccelError, ValueError):
    """Quantization cannot be applied as asked; the model is left as it was."""


def quantizable(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv2d layer of the model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def fingerprint(model: torch.nn.Module) -> str:
    """Identifies the model (class, config, weights) so a calibration is never applied to another."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, value in model.state_dict().items():
        digest.update(f"{name}{tuple(value.shape)}{float(value.detach().double().abs().sum()):.6e}".encode())
    return digest.hexdigest()[:16]


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

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {"format": FORMAT, "model_class": self.model_class, "fingerprint": self.fingerprint,
                "act_bits": str(self.act_bits), "num_steps": str(self.num_steps), "splits": json.dumps(self.splits)}
        tmp = path.with_name(path.name + ".tmp")
        save_file({name: t.contiguous() for name, t in self.absmax.items()}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
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
                   absmax, {k: int(v) for k, v in json.loads(meta.get("splits", "{}")).items()})

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
            if not torch.isfinite(ranges).all():
                raise QuantError(f"calibrated range of {name} is not finite: the calibration runs diverged; "
                                 "calibrate with other inputs or fewer guidance")
            if not (ranges[-1] > 0).all():
                raise QuantError(f"calibrated range of {name} is zero: the calibration inputs never reach "
                                 "this layer; use more varied calibration inputs")


@torch.no_grad()
def calibrate(pipe, labels: list, seeds: list[int], num_steps: int = 50, guidance: float = 3.0,
              act_bits: int = 8, batch_size: int = 16, split_shortcut: bool = True,
              progress: bool = True) -> Calibration:
    """Run the pipeline on calibration inputs (class ids, or prompt embeddings for pipelines that take
    them as their first argument) and record every layer's input range at every step."""
    model = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    layers = quantizable(model)
    splits = shortcut_splits(model) if split_shortcut else {}
    ranges = {name: torch.zeros(num_steps, 2 if name in splits else 1) for name in layers}
    clock = {"step": -1}

    def on_model(module, args, kwargs):
        clock["step"] += 1

    def recorder(name: str):
        def hook(module, args):
            x = args[0].detach().float()
            step = min(clock["step"], num_steps - 1)
            if name in splits:
                cut = splits[name]
                values = torch.stack([x[:, :cut].abs().amax(), x[:, cut:].abs().amax()])
            else:
                values = x.abs().amax().reshape(1)
            ranges[name][step] = torch.maximum(ranges[name][step], values.cpu())
        return hook

    handles = [model.register_forward_pre_hook(on_model, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(recorder(name)) for name, layer in layers.items()]
    try:
        starts = range(0, len(labels), batch_size)
        for start in tqdm(starts, desc="calibrating", disable=not progress or len(starts) < 2):
            clock["step"] = -1
            gens = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
            pipe(labels[start:start + batch_size], num_inference_steps=num_steps, guidance_scale=guidance,
                 generator=gens)
    finally:
        for handle in handles:
            handle.remove()
    absmax = {name: torch.cat([r, r.amax(dim=0, keepdim=True)]) for name, r in ranges.items()}
    return Calibration(type(model).__name__, fingerprint(model), act_bits, num_steps, absmax, splits)

"""One fingerprint of a model's weights: plans and calibrations remember what they were fitted on.

The digest covers the class, the config and, per tensor, its name, shape and the sum of its
absolute values (one reduction per tensor: cheap next to a sampling run, also on a GPU), so any
retraining or fine-tuning changes it while moving the model between devices does not.
"""

from __future__ import annotations

import hashlib
import json

import torch


def fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits identifying the model's class, config and weights."""
    digest = hashlib.sha256(type(model).__name__.encode())
    public = public_config(model)
    if public is not None:
        digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, value in model.state_dict().items():
            digest.update(f"{name}{_summary(value)}".encode())
    return digest.hexdigest()[:16]


def public_config(obj: object) -> dict | None:
    """``obj``'s config (diffusers' or transformers') without its "_" keys, which vary by process;
    None when it has none."""
    config = getattr(obj, "config", None)
    if config is None:
        return None
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in items.items() if not k.startswith("_")}


def _summary(value: object) -> str:
    """Shape and absolute sum of a tensor; a library's packed tensor (quantized weights) or a missing
    entry contributes its type and shape only."""
    if type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
        return f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}"
    total = float(value.detach().double().abs().sum()) if value.numel() else 0.0
    return f"{tuple(value.shape)}{total:.6e}"

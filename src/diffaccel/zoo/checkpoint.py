"""Training checkpoints as safetensors (never pickle): model, EMA, AdamW state and the step.

Writes go to a temporary file that is renamed into place, so an interruption at any moment leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def save(path: Path, model: torch.nn.Module, ema: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
         step: int, meta: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        tensors[f"model/{name}"] = value.detach().cpu().contiguous()
    for name, value in ema.items():
        tensors[f"ema/{name}"] = value.cpu().contiguous()
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"opt/{index}/{key}"] = torch.as_tensor(value).cpu().contiguous()
    header = {"step": step, "param_groups": opt_state["param_groups"], "meta": meta}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"diffaccel": json.dumps(header)})
    os.replace(tmp, path)


def load(path: Path, model: torch.nn.Module, ema: dict[str, torch.Tensor],
         optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore into the given objects; returns ``(step, meta)``."""
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["diffaccel"])
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    for name in ema:
        ema[name].copy_(tensors[f"ema/{name}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, field = key.split("/", 2)
            state.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    return header["step"], header["meta"]

"""Training checkpoints as safetensors (never pickle): model, EMA, AdamW state and the step.

Writes go to a temporary file that is renamed into place, so an interruption at any moment leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from diffaccel.errors import DiffaccelError


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


def read_header(path: Path) -> dict:
    """The checkpoint's header (step, optimizer groups, meta); a one-line error for a file that is not one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("diffaccel", "null"))
    except (SafetensorError, ValueError):
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("step"), int):
        raise DiffaccelError(f"{path} is not a diffaccel training checkpoint: move it away, or train into another "
                             "--out")
    return header


def load(path: Path, model: torch.nn.Module, ema: dict[str, torch.Tensor],
         optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore into the given objects; returns ``(step, meta)``."""
    header = read_header(path)
    tensors = load_file(str(path))
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
        for name in ema:
            ema[name].copy_(tensors[f"ema/{name}"])
    except (RuntimeError, KeyError) as exc:  # the tensors of another model (its train_config.json lost or edited)
        raise DiffaccelError(f"{path} holds the checkpoint of another model than its recipe builds "
                             f"({str(exc).splitlines()[0][:120]}): train into another --out") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, field = key.split("/", 2)
            state.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    return header["step"], header["meta"]

"""A resumable, reproducible training loop shared by every text-to-image part (VAE, denoisers, evaluator).

The caller gives a module and ``loss_at(step, generator) -> loss``; the data of step ``s`` must be a
function of ``s`` alone and every random draw must come from the generator, which is seeded with
``(seed, s)``. Together with the safetensors checkpoints of :mod:`diffaccel.zoo.checkpoint` (model,
EMA, AdamW state), a run resumed from a checkpoint continues exactly as an uninterrupted one would.
The schedule (warm-up then cosine decay) is :func:`diffaccel.zoo.train.lr_at`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from diffaccel.zoo import checkpoint
from diffaccel.zoo.train import lr_at

CHECKPOINT = "checkpoint.safetensors"


class LoopSettings(Protocol):
    """The fields the loop reads (the training configuration of :mod:`diffaccel.zoo.t2i.train` has them)."""

    steps: int
    lr: float
    warmup: int
    weight_decay: float
    ema_decay: float
    seed: int
    checkpoint_every: int
    time_limit_min: float
    stop_after: int


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _ema_update(ema: dict[str, torch.Tensor], module: torch.nn.Module, decay: float) -> None:
    state = module.state_dict()
    floats = [k for k, v in ema.items() if v.dtype.is_floating_point]
    torch._foreach_lerp_([ema[k] for k in floats], [state[k] for k in floats], 1 - decay)
    for name in ema:
        if name not in floats:
            ema[name].copy_(state[name])


def new_state(module: torch.nn.Module, cfg: LoopSettings) -> tuple[torch.optim.Optimizer, dict[str, torch.Tensor]]:
    """AdamW over the trainable parameters and an EMA copy of the full state."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, {k: v.detach().clone() for k, v in module.state_dict().items()}


def load_ema(module: torch.nn.Module, cfg: LoopSettings, out: Path) -> int:
    """Load the EMA weights of the run in ``out`` into ``module``; returns the checkpoint's step."""
    optimizer, ema = new_state(module, cfg)
    step, _ = checkpoint.load(out / CHECKPOINT, module, ema, optimizer)
    module.load_state_dict(ema)
    return step


def run(module: torch.nn.Module, loss_at: Callable[[int, torch.Generator], torch.Tensor], cfg: LoopSettings,
        out: Path, recipe: dict, desc: str = "train", show_progress: bool = True) -> dict:
    """Train (or resume) ``module`` into ``out``; returns the final step, recent losses and seconds per step.
    ``recipe`` becomes ``train_config.json`` once the checkpoint has loaded (a resume that fails keeps the old)."""
    optimizer, ema = new_state(module, cfg)
    step, losses = 0, []
    if (out / CHECKPOINT).exists():
        step, meta = checkpoint.load(out / CHECKPOINT, module, ema, optimizer)
        losses = meta.get("losses", [])
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(recipe, indent=2))
    last = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    start, first = time.monotonic(), step
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=not show_progress, mininterval=30)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    while step < last:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = loss_at(step, step_generator(cfg.seed, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            _ema_update(ema, module, min(cfg.ema_decay, (1 + step) / (10 + step)))
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        timed_out = cfg.time_limit_min and time.monotonic() - start > cfg.time_limit_min * 60
        if step % cfg.checkpoint_every == 0 or step == last or timed_out:
            checkpoint.save(out / CHECKPOINT, module, ema, optimizer, step, {"losses": losses[-2000:]})
        if timed_out:
            break
    bar.close()
    seconds = (time.monotonic() - start) / max(1, step - first)
    return {"step": step, "loss_first": losses[:10], "loss_last": losses[-10:], "seconds_per_step": seconds}

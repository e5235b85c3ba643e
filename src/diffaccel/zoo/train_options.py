"""What every training recipe (``zoo.train``, ``zoo.t2i.train``, ``lm.train``) checks of its
options before any work, and the help text of the options they share: one-line errors that name
the option."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

COMMON_HELP = {  # the options every training recipe shares
    "steps": "optimizer steps of the whole run",
    "lr": "peak learning rate (linear warm-up, then cosine decay to a tenth)",
    "warmup": "warm-up steps",
    "weight_decay": "AdamW weight decay",
    "ema_decay": "decay of the EMA weights that are exported (0 to 1)",
    "seed": "seed of every random draw (a run is reproducible from it)",
    "checkpoint_every": "steps between checkpoints",
    "time_limit_min": "stop, after a checkpoint, once this many minutes have passed (0: no limit)",
}


def check_numbers(values: dict[str, Any], at_least: dict[str, float], positive: tuple[str, ...] = (),
                  fractions: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, a number out of its range: ``at_least`` maps names to minimums,
    ``positive`` must be > 0, ``fractions`` lie in [0, 1]; every float must be finite."""
    for name, value in values.items():
        option = f"--{name.replace('_', '-')}"
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{option} must be a finite number, got {value}")
        if name in at_least and value < at_least[name]:
            raise ValueError(f"{option} must be >= {at_least[name]:g}, got {value:g}")
        if name in positive and value <= 0:
            raise ValueError(f"{option} must be > 0, got {value:g}")
        if name in fractions and not 0 <= value <= 1:
            raise ValueError(f"{option} must be between 0 and 1, got {value:g}")


def json_object(option: str, text: str) -> dict:
    """``text`` read as the JSON object an option must hold; a one-line error naming the option if not."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option} must be a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object, got {text!r}")
    return value


def check_folder(option: str, path: Path | None) -> None:
    """Refuse a file standing where an output folder (or a folder above it) is to be made."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None) if path is not None else None
    if existing is not None and not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise ValueError(f"{option} {path}: a file stands where the output folder should be{where}; "
                         f"choose another {option}")


WHEN_TO_STOP = ("steps", "stop_after", "time_limit_min", "checkpoint_every", "eval_every", "device", "workers")


def check_recipe(out: Path, recipe: dict[str, Any]) -> None:
    """A run in ``out`` continues only with the recipe it was saved with (``train_config.json``): settings
    that only say when to stop or where to run may change; any other change is refused, naming it (it
    would train on another recipe and record that as the run's own)."""
    path = out / "train_config.json"
    if not (out / "checkpoint.safetensors").exists() or not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the run's recipe {path}: {exc}") from None
    changed = sorted(k for k, v in recipe.items() if k not in WHEN_TO_STOP and k in saved and saved[k] != v)
    if changed:
        raise ValueError(f"{out} holds a run saved with another recipe: "
                         + ", ".join(f"--{k.replace('_', '-')} {recipe[k]} (saved: {saved[k]})" for k in changed)
                         + "; continue it with its own settings, or train into another --out")

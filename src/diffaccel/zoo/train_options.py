"""What every training recipe (``zoo.train``, ``zoo.t2i.train``, ``lm.train``) checks of its
options before any work, and the help text of the options they share: one-line errors that name
the option."""

from __future__ import annotations

import difflib
import inspect
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from diffaccel.zoo import checkpoint

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


def init_settings(cls: type) -> set[str]:
    """The keyword settings ``cls(...)`` takes (a diffusers model's config keys)."""
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {n for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self" and p.kind not in skip}


def check_overrides(option: str, text: str, accepted: Iterable[str], owner: str) -> dict:
    """``text`` as a JSON object of settings ``owner`` takes; a misspelled one is refused by name before any
    work (the model's constructor had failed with a TypeError, or a config kept it unread)."""
    value, accepted = json_object(option, text), set(accepted)
    unknown = sorted(set(value) - accepted)
    if unknown:
        close = [m for name in unknown for m in difflib.get_close_matches(name, accepted, n=1)]
        hint = f"did you mean {', '.join(close)}?" if close else f"its settings: {', '.join(sorted(accepted))}"
        raise ValueError(f"{option}: {', '.join(unknown)} is not a setting of {owner} ({hint})")
    return value


def check_folder(option: str, path: Path | None) -> None:
    """Refuse a file standing where an output folder (or a folder above it) is to be made."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None) if path is not None else None
    if existing is not None and not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise ValueError(f"{option} {path}: a file stands where the output folder should be{where}; "
                         f"choose another {option}")


WEIGHTS_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "training.json")  # one model's export


def check_export(option: str, dest: Path | None, writes: Iterable[str], keep: dict[str, Path | None] | None = None
                 ) -> None:
    """Refuse an output folder whose files an export would overwrite or delete: ``dest`` must be new, empty or
    an earlier export (``training.json`` and only the names in ``writes``), and neither be nor hold a folder of
    ``keep`` (the run's --out, the VAE it reads)."""
    if dest is None:
        return
    for name, path in (keep or {}).items():
        kept = Path(path).resolve() if path is not None else None
        if kept is not None and (dest.resolve() == kept or dest.resolve() in kept.parents):
            raise ValueError(f"{option} {dest} would overwrite {name} {path}: write it to another folder")
    entries = sorted(p.name for p in dest.iterdir()) if dest.is_dir() else []
    others = [e for e in entries if e not in set(writes)]
    if entries and (others or "training.json" not in entries):
        raise ValueError(f"{option} {dest} is not empty and not an earlier export of this model (it holds "
                         f"{', '.join((others or entries)[:5])}): choose a new or empty folder")


WHEN_TO_STOP = ("steps", "stop_after", "time_limit_min", "checkpoint_every", "eval_every", "device", "workers",
                "latents")  # latents: where a cache of the same latents lives


def _same(saved: Any, given: Any) -> bool:
    """Equal settings; JSON texts compare by what they hold ('{"a":1}' equals '{"a": 1}')."""
    if isinstance(saved, str) and isinstance(given, str):
        try:
            return json.loads(saved) == json.loads(given)
        except ValueError:
            pass
    return saved == given


def check_recipe(out: Path, recipe: dict[str, Any]) -> None:
    """A run in ``out`` continues only with the recipe it was saved with (``train_config.json``): settings
    that only say when to stop or where to run may change; any other change is refused, naming it (it
    would train on another recipe and record that as the run's own). ``--steps`` may not fall below the
    checkpoint's step (the run would record a length it has passed)."""
    path = out / "train_config.json"
    if not (out / "checkpoint.safetensors").exists():
        return
    step = checkpoint.read_header(out / "checkpoint.safetensors")["step"]
    if recipe.get("steps", step) < step:
        raise ValueError(f"--steps {recipe['steps']}: the run in {out} has trained {step} steps already; give "
                         f"--steps {step} or more, or train into another --out")
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the run's recipe {path}: {exc}") from None
    changed = sorted(k for k, v in recipe.items() if k not in WHEN_TO_STOP and k in saved and not _same(saved[k], v))
    if changed:
        raise ValueError(f"{out} holds a run saved with another recipe: "
                         + ", ".join(f"--{k.replace('_', '-')} {recipe[k]} (saved: {saved[k]})" for k in changed)
                         + "; continue it with its own settings, or train into another --out")

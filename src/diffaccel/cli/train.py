"""``diffaccel train``: retrain a shipped model or evaluator with its recipe's own options.

``--model dit|unet|evaluator`` (the class-label zoo), ``vae|t2i_evaluator|pixart|sd`` (the
text-to-image zoo), ``dlm`` (the diffusion language model); every recipe is reproducible from its
seed and resumable but the evaluator's, which is short and starts over (``--help-train`` lists the
options of the one chosen).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import typer

from diffaccel.cli.common import app, run_guarded, setup
from diffaccel.errors import UnsupportedModelError
from diffaccel.lm.train import main as lm_main
from diffaccel.zoo.t2i.train import MODELS as T2I_MODELS
from diffaccel.zoo.t2i.train import main as t2i_main
from diffaccel.zoo.train import MODELS as ZOO_MODELS
from diffaccel.zoo.train import main as zoo_main

MODELS = (*ZOO_MODELS, *T2I_MODELS, "dlm")


def option(args: list[str], name: str) -> str | None:
    """The value of ``name`` in ``args`` (``--name VALUE`` or ``--name=VALUE``), None when not given."""
    given = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == name), None)
    return given or next((a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")), None)


def saved_model(out: str | None) -> str | None:
    """The model of the run in ``out`` (its train_config.json; the LM's has no ``model``), so that continuing
    a run needs no ``--model``."""
    try:
        saved = json.loads((Path(out) / "train_config.json").read_text()) if out else None
    except (OSError, ValueError):
        return None
    return saved.get("model", "dlm") if isinstance(saved, dict) else None


def recipe(args: list[str]) -> tuple[Callable[[list[str]], object], list[str]]:
    """The training entry point for ``--model`` in ``args`` (default: the model of the run in ``--out``, else
    dit), and the arguments it takes."""
    model = option(args, "--model")
    if model is None and (model := saved_model(option(args, "--out"))) in MODELS and model != "dlm":
        args = [*args, "--model", model]
    if model is not None and model not in MODELS:
        raise UnsupportedModelError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    if model == "dlm":  # one model: its recipe has no --model
        return lm_main, [a for i, a in enumerate(args) if a != "--model=dlm" and not (
            a == "--model" or (i and args[i - 1] == "--model"))]
    if model in T2I_MODELS:
        return t2i_main, args
    if "--resume" in args or "--export-only" in args:
        raise UnsupportedModelError("--resume and --export-only belong to the text-to-image and dlm recipes: pass "
                                    f"--model ({', '.join((*T2I_MODELS, 'dlm'))}); a dit or unet run continues "
                                    "when rerun without --resume")
    return zoo_main, args


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Train a model or an evaluator with its recipe: `diffaccel train --model M --out DIR [options]`.
    Every run is reproducible from its seed and resumable (`--model` may then be left out), but the
    evaluator's: it is short and starts over.

    Models (`--model`, default dit):

    * **dit**, **unet**: the class-label denoisers; **evaluator**: the classifier behind their quality metrics
    * **vae**, **pixart**, **sd**, **t2i_evaluator**: the text-to-image zoo (train the vae first)
    * **dlm**: the diffusion language model

    Each recipe has its own options (steps, batch, lr, seed, ...): list them with
    `diffaccel train --model M --help-train`, e.g. `diffaccel train --model dit --help-train`."""
    setup()
    args = ["--help" if a == "--help-train" else a for a in ctx.args]
    main, rest = run_guarded(recipe, args)
    out = option(rest, "--out")
    run_guarded(main, rest, out_dir=Path(out) if out else None)

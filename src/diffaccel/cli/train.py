"""``diffaccel train``: retrain a shipped model or evaluator with its recipe's own options.

``--model dit|unet|evaluator`` (the class-label zoo), ``vae|t2i_evaluator|pixart|sd`` (the
text-to-image zoo), ``dlm`` (the diffusion language model); every recipe is resumable and
reproducible from its seed (``--help-train`` lists the options of the one chosen).
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from diffaccel.cli.common import app, run_guarded
from diffaccel.errors import UnsupportedModelError
from diffaccel.lm.train import main as lm_main
from diffaccel.zoo.t2i.train import MODELS as T2I_MODELS
from diffaccel.zoo.t2i.train import main as t2i_main
from diffaccel.zoo.train import MODELS as ZOO_MODELS
from diffaccel.zoo.train import main as zoo_main

MODELS = (*ZOO_MODELS, *T2I_MODELS, "dlm")


def recipe(args: list[str]) -> tuple[Callable[[list[str]], object], list[str]]:
    """The training entry point for ``--model`` in ``args`` (default: dit), and the arguments it takes."""
    model = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--model"), None)
    model = model or next((a.split("=", 1)[1] for a in args if a.startswith("--model=")), None)
    if model is not None and model not in MODELS:
        raise UnsupportedModelError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    if model == "dlm":  # one model: its recipe has no --model
        return lm_main, [a for i, a in enumerate(args) if a != "--model=dlm" and not (
            a == "--model" or (i and args[i - 1] == "--model"))]
    if model in T2I_MODELS:
        return t2i_main, args
    return zoo_main, args


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Train a model or an evaluator with its recipe: `diffaccel train --model M --out DIR [options]`.
    Every run is resumable and reproducible from its seed.

    Models (`--model`, default dit):

    * **dit**, **unet**: the class-label denoisers; **evaluator**: the classifier behind their quality metrics
    * **vae**, **pixart**, **sd**, **t2i_evaluator**: the text-to-image zoo (train the vae first)
    * **dlm**: the diffusion language model

    Each recipe has its own options (steps, batch, lr, seed, ...): list them with
    `diffaccel train --model M --help-train`, e.g. `diffaccel train --model dit --help-train`."""
    args = ["--help" if a == "--help-train" else a for a in ctx.args]
    main, rest = run_guarded(recipe, args)
    run_guarded(main, rest)

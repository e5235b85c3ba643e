"""``diffaccel train``: retrain a shipped model or evaluator with its recipe's own options.

``--model dit|unet|evaluator`` (the class-label zoo), ``vae|t2i_evaluator|pixart|sd`` (the
text-to-image zoo), ``dlm`` (the diffusion language model); every recipe is resumable and
reproducible from its seed (``--help-train`` lists the options of the one chosen).
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from diffaccel.cli.common import app
from diffaccel.lm.train import main as lm_main
from diffaccel.zoo.t2i.train import MODELS as T2I_MODELS
from diffaccel.zoo.t2i.train import main as t2i_main
from diffaccel.zoo.train import main as zoo_main


def recipe(args: list[str]) -> tuple[Callable[[list[str]], object], list[str]]:
    """The training entry point for ``--model`` in ``args``, and the arguments it takes."""
    model = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--model"), None)
    model = model or next((a.split("=", 1)[1] for a in args if a.startswith("--model=")), None)
    if model == "dlm":  # one model: its recipe has no --model
        return lm_main, [a for i, a in enumerate(args) if a != "--model=dlm" and not (
            a == "--model" or (i and args[i - 1] == "--model"))]
    if model in T2I_MODELS:
        return t2i_main, args
    return zoo_main, args


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Train a model or an evaluator: --model dit|unet|evaluator|vae|t2i_evaluator|pixart|sd|dlm --out DIR
    (its recipe's options: `diffaccel train --model M --help-train`)."""
    args = ["--help" if a == "--help-train" else a for a in ctx.args]
    main, rest = recipe(args)
    main(rest)

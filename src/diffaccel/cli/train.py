"""``diffaccel train``: retrain an embedded model or the evaluator (the recipe's own options)."""

from __future__ import annotations

import typer

from diffaccel.cli.common import app
from diffaccel.zoo.train import main as train_main


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Train a model or the evaluator (options: see `diffaccel train --help-train`)."""
    train_main(["--help" if a == "--help-train" else a for a in ctx.args])

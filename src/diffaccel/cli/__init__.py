"""Command line: ``diffaccel generate | plan | methods | quantize | search | bench | report | train``,
one module per command. ``main`` is the installed entry point."""

from __future__ import annotations

import sys

import typer

from diffaccel import IMPORT_STARTED
from diffaccel.cli import bench, common, generate, plans, quantize, search, train  # noqa: F401  (register the commands)
from diffaccel.cli.common import app

INTERRUPTED = 130  # the shell's code for Ctrl-C
INTERRUPTED_TEXT = ("interrupted: what was finished is kept (a search's study, a bench's finished groups, training "
                    "checkpoints); the same command resumes a search or an image model's training, add --resume "
                    "for bench or the LM's training")


def script() -> None:
    """The installed ``diffaccel`` script and ``python -m diffaccel``: ``main`` as the process itself, whose
    time limits count from when importing diffaccel began (torch and diffusers take seconds)."""
    common.COMMAND_STARTED = IMPORT_STARTED
    main()


def main() -> None:
    """Entry point: click's usage errors and our own come out as one line, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        code = INTERRUPTED
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.TyperException as exc:  # usage errors: bad option values, unknown options
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if message.strip():  # empty for "no command given", after the help was shown
            typer.echo(f"error: {' '.join(message.split())}", err=True)
        code = getattr(exc, "exit_code", 2)
    if code == INTERRUPTED:  # typer returns Ctrl-C as this code, having caught the KeyboardInterrupt itself
        typer.echo(INTERRUPTED_TEXT, err=True)
    sys.exit(code or 0)


__all__ = ["app", "main", "script"]

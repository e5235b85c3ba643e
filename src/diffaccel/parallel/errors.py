"""The one error of parallel runs: ranks that cannot work together, or a mode that does not apply."""

from __future__ import annotations

from diffaccel.errors import DiffaccelError


class ParallelError(DiffaccelError, ValueError):
    """Ranks disagree (plan, weights, settings), or a parallel mode cannot split this model or call.

    A ``ValueError`` too, so the command line prints it as one line, like every error about what
    the user asked for."""

"""Every exception diffaccel raises for the user: each message says what is wrong and what to do.

The CLI prints a ``DiffaccelError`` as one line and exits non-zero. Errors about values the user
passed also derive from ``ValueError``, so code that catches ``ValueError`` keeps working.
"""

import contextlib
import sys
import warnings
from pathlib import Path

# frames a warning is not about: diffaccel's own, and the libraries between it and the user's line
_INTERNAL = (str(Path(__file__).parent), contextlib.__file__)
_LIBRARIES = ("torch", "diffusers", "transformers")


def warn(warning: Warning | str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the user's line: the first caller outside diffaccel, contextlib
    (``accelerate`` is a context manager) and the libraries a pipeline call runs through."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(warning, category, stacklevel=level)


def _internal(filename: str) -> bool:
    return filename.startswith(_INTERNAL) or any(
        module is not None and filename.startswith(str(Path(module.__file__).parent))
        for module in (sys.modules.get(name) for name in _LIBRARIES) if getattr(module, "__file__", None))


class DiffaccelError(Exception):
    """Base class of every error meant for the user."""


class WeightsError(DiffaccelError):
    """Model weights are missing, corrupt or of the wrong kind."""


class UnsupportedModelError(DiffaccelError, ValueError):
    """No adapter knows this model, or a pipeline has no denoiser diffaccel can find."""


class PlanError(DiffaccelError, ValueError):
    """A plan is malformed or does not fit the model or the call it is applied to."""


class CacheError(PlanError):
    """A cached tensor went bad (NaN or infinity) while a plan was running."""


class MethodError(DiffaccelError, ValueError):
    """A method was asked for with settings that cannot make a plan for this model."""


class WorkloadError(DiffaccelError, ValueError):
    """The calibration workload (the pipeline calls to run) is empty, unreadable or does not fit."""


class QuantError(DiffaccelError, ValueError):
    """Quantization cannot be applied as asked; the model is left as it was."""


class SearchError(DiffaccelError):
    """Base class of the search's errors."""


class SettingError(SearchError, ValueError):
    """A search setting the user passed cannot work."""


class BudgetError(SearchError, ValueError):
    """The quality budget cannot be read."""


class CalibrationError(SearchError):
    """The calibration set is empty, broken, or does not fit the model or the search."""


class StorageMismatchError(SearchError):
    """The search storage holds a search of another model (or calibration set)."""


# how gloo reports a peer that died, or hangs past the group's timeout ("Timed out waiting 15000ms for
# recv operation to complete"; send alike): a plain RuntimeError, not torch's DistError
LOST_PEER_MARKS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting")


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` (or the error it was raised from) says another process of the group is gone, or
    stopped answering."""
    while exc is not None:
        if isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in LOST_PEER_MARKS):
            return True
        exc = exc.__cause__
    return False


class PlanWarning(UserWarning):
    """A plan runs, but perhaps not as it was meant to (other weights or another scheduler than it was
    fitted with)."""


class SearchWarning(UserWarning):
    """The plan a search returns misses its budget (on the calibration or the held-out images)."""


class BenchError(DiffaccelError):
    """A benchmark run cannot start or continue as asked."""


class SweepError(BenchError, ValueError):
    """A sweep of settings is malformed."""

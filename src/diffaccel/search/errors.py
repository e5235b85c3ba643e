"""What can go wrong in a search, as user-facing errors (the CLI prints them as one line)."""

from diffaccel.errors import DiffaccelError


class SearchError(DiffaccelError):
    """Base class of the search's errors."""


class BudgetError(SearchError):
    """The quality budget cannot be read."""


class CalibrationError(SearchError):
    """The calibration set is empty, broken, or does not fit the model or the search."""


class StorageMismatchError(SearchError):
    """The search storage holds a search of another model (or calibration set)."""

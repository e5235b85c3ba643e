"""Exceptions that carry a message meant for the user: what is wrong and what to do about it."""


class DiffaccelError(Exception):
    """Base class; the CLI prints these as one line and exits non-zero."""


class WeightsError(DiffaccelError):
    """Model weights are missing, corrupt or of the wrong kind."""

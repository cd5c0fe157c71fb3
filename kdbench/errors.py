"""User-facing errors.

Anything a user can cause (a missing file, a malformed row, a wrong model path, an
out-of-range setting) raises :class:`KdbenchError` with one sentence that says what to do.
The CLI prints that sentence and exits with code 2; it never shows a traceback for it.
"""

from __future__ import annotations


class KdbenchError(Exception):
    """An error the user can fix; ``str(err)`` is the one sentence shown to them."""

    exit_code = 2


class ConfigError(KdbenchError):
    """A setting is unknown, malformed or out of range."""


class DataError(KdbenchError):
    """A data file is missing, unreadable or has malformed rows."""


class ModelError(KdbenchError):
    """A model path does not exist, cannot be loaded, or does not fit its partner model."""


class TrainingError(KdbenchError):
    """Training cannot go on (for example a non-finite loss)."""

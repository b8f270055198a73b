"""User-facing errors.

Anything raised as :class:`ScaleOTError` is a problem with the user's input or environment that
the user can fix; the CLI prints its message on one line and exits non-zero, without a traceback.
Everything else is a bug and keeps its traceback.
"""


class ScaleOTError(Exception):
    """An error the user can act on; the message says what was wrong and what to do."""


class ConfigError(ScaleOTError, ValueError):
    """A parameter or configuration value is invalid."""


class IntegrityError(ScaleOTError):
    """A file on disk does not match what its manifest promises (missing, tampered, foreign)."""

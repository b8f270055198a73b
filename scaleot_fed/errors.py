"""User-facing errors: one family.

Anything raised as :class:`ScaleOTError` is a problem the user can fix; the CLI prints its
message on one line and exits with status 2, without a traceback. Bad input (a value, a file, a
folder) is a :class:`ConfigError` wherever it is detected; a file that does not match what it
promises is its subclass :class:`IntegrityError`. A run that fails on the way (too few owners
answered) is a :class:`RunError`. Everything else is a bug and keeps its traceback.
"""


class ScaleOTError(Exception):
    """An error the user can act on; the message says what was wrong and what to do."""


class ConfigError(ScaleOTError, ValueError):
    """A parameter, configuration value, file or folder given by the user is invalid."""


class IntegrityError(ConfigError):
    """A file on disk does not match what its manifest promises (missing, tampered, foreign)."""


class RunError(ScaleOTError):
    """A run stopped because the work could not go on (e.g. too few data owners answered)."""

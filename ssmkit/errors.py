"""The errors ssmkit raises for problems with what it was given: each message names the file, option or
value and says what is wrong, in one line (the `ssmkit` command prints just that line)."""
from __future__ import annotations

__all__ = ["SsmkitError", "ConfigError", "DataError", "CheckpointError", "RunError"]


class SsmkitError(Exception):
    """Base class: a problem with the input, not a bug; the message is meant for the user as it is."""


class ConfigError(SsmkitError, ValueError):
    """An option or configuration file that cannot be used (unknown key, wrong type, out of range)."""


class DataError(SsmkitError, ValueError):
    """A data file or folder that is missing, empty or malformed."""


class CheckpointError(SsmkitError, ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


class RunError(SsmkitError, RuntimeError):
    """A run that cannot go on as asked (a run folder in the way, a batch larger than the data, ...)."""

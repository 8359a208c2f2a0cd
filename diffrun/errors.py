"""Errors a user can act on. Each message names the key or path and what to do about it."""


class DiffrunError(Exception):
    """Base class: caught at the command line and printed without a traceback."""


class ConfigError(DiffrunError, ValueError):
    """A config value is wrong: the message names the key, the value and what is allowed."""


class DataError(DiffrunError):
    """A dataset is missing or malformed: the message names the path and the fix."""


class CheckpointError(DiffrunError):
    """A checkpoint cannot be read or does not match the run."""

"""Errors alignednorm raises for bad input.

Every message names the file, key or value at fault and says what was expected, so the CLI
can print it as it is, without a traceback.
"""


class AlignedNormError(Exception):
    """Base class: an error caused by the user's input, printed without a traceback."""


class DataError(AlignedNormError):
    """A dataset folder, split file or image is missing or malformed."""


class CheckpointError(AlignedNormError):
    """A checkpoint has an unknown format, missing keys or wrong shapes."""


class ConfigError(AlignedNormError):
    """A config key is unknown or a value is out of range."""

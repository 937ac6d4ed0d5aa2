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


def state_mismatch(expected: dict, given: dict, limit: int = 8) -> str:
    """What keeps ``given`` tensors from loading into ``expected`` ones ("" when they fit).

    Lists missing keys, unexpected keys and wrong shapes (``key: checkpoint (..) vs model (..)``),
    at most ``limit`` of each, for messages that say exactly what a checkpoint lacks.
    """

    def listed(items: list[str]) -> str:
        return f"{items[:limit]}{' ...' if len(items) > limit else ''}"

    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in given and tuple(given[k].shape) != tuple(v.shape)]
    parts = [f"{name} {listed(items)}" for name, items in
             (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if items]
    return "; ".join(parts)

"""The error types hsc-fast raises for bad input. Each message names the file/field and what was expected."""


class HscError(Exception):
    """Base class: every error we raise on purpose for bad input or bad state."""


class ConfigError(HscError, ValueError):
    """A configuration key, value or combination is wrong (raised before any work starts)."""


class DataError(HscError, ValueError):
    """A dataset file (image, mask, list, label file, shard member) is missing or malformed."""


class WeightsError(HscError, ValueError):
    """A weights/checkpoint file is missing, unreadable or does not fit the model."""


class TrainingError(HscError, RuntimeError):
    """Training cannot continue (too many non-finite losses in a row, a dead rank, ...)."""

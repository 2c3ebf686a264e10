"""The error both adapter formats (loralib's and PEFT's) raise, and the number check their configs go through."""
import math


class AdapterError(ValueError):
    """An adapter directory that is missing, incomplete, corrupted, unsafe, or does not fit the model."""


def is_number(x) -> bool:
    """Whether a config value is a finite JSON number (an int or a float, not a bool, not NaN or infinite)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

"""The one exception type that sae-registry raises for bad input and bad state."""


class SAERegistryError(ValueError):
    """Something a person must fix: a bad option, a bad input, a missing or broken file.

    The message says what was wrong and what to do. It subclasses ``ValueError`` so that code
    which already catches bad values keeps working.
    """


def require_positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive integer (bools excluded), else an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SAERegistryError(f"{name} must be a positive integer, got {value!r}")
    return value

"""The one exception type that sae-registry raises for bad input and bad state, and the small checks
every public entry point runs on its arguments before any work starts."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable

# Characters a terminal acts on: C0/C1 controls (ESC, BEL, CR, ...) and the bidirectional overrides
# that reorder what is shown.
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def printable(text: object) -> str:
    """``str(text)`` with every control or bidirectional-override character written as an escape (``\\x1b``).

    For anything shown that someone else wrote (tags, names, tokens, run names from a registry or a
    store): printed as is, it could move the cursor, rewrite earlier lines or change the terminal's title.
    """
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) == "Cc" or ch in _BIDI
                   else ch for ch in str(text))


class SAERegistryError(ValueError):
    """Something a person must fix: a bad option, a bad input, a missing or broken file.

    The message says what was wrong and what to do. It subclasses ``ValueError`` so that code
    which already catches bad values keeps working.
    """


def require_int(name: str, value: object, *, min: int | None = None, max: int | None = None) -> int:
    """``value`` if it is an integer (bools excluded) within ``[min, max]``, else an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SAERegistryError(f"{name} must be an integer, got {value!r}")
    if min is not None and value < min:
        raise SAERegistryError(f"{name} must be >= {min}, got {value}")
    if max is not None and value > max:
        raise SAERegistryError(f"{name} must be <= {max}, got {value}")
    return value


def require_positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive integer (bools excluded), else an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SAERegistryError(f"{name} must be a positive integer, got {value!r}")
    return value


def require_float(
    name: str, value: object, *, min: float | None = None, max: float | None = None, above: float | None = None
) -> float:
    """``value`` as a finite float within ``[min, max]`` (and ``> above``), else an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SAERegistryError(f"{name} must be a finite number, got {value!r}")
    if min is not None and value < min:
        raise SAERegistryError(f"{name} must be >= {min:g}, got {value:g}")
    if max is not None and value > max:
        raise SAERegistryError(f"{name} must be <= {max:g}, got {value:g}")
    if above is not None and value <= above:
        raise SAERegistryError(f"{name} must be > {above:g}, got {value:g}")
    return float(value)


def require_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else an error naming ``name`` and listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise SAERegistryError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_family_name(family: str) -> str:
    """``family`` when it can name an MLflow registered model and an experiment, else a clear error."""
    if not isinstance(family, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", family):
        raise SAERegistryError(
            f"family name {family!r} must be 1-128 letters, digits, '.', '_' or '-' (no '/' or '@')"
        )
    return family

"""Checks of sizes and values where they enter the library (configs, API arguments, files).

A bad size must fail at once with its name and value, not as uninitialised memory, a NaN
loss or a crash deep in d3rlpy; a non-finite number in data must be named by row and field.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

__all__ = ["positive", "optional_positive", "non_negative", "first_non_finite"]


def positive(value: object, name: str) -> int:
    """``value`` as an int >= 1 (bools and fractional numbers are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def optional_positive(value: object, name: str) -> int | None:
    """Like :func:`positive`, with ``None`` meaning "the default"."""
    return None if value is None else positive(value, name)


def non_negative(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def first_non_finite(array: np.ndarray) -> tuple[int, int] | None:
    """(row, column) of the first NaN/inf in a 1-d or 2-d float array, or ``None``."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return None
    bad = ~np.isfinite(array.reshape(len(array), -1))
    if not bad.any():
        return None
    row, col = np.argwhere(bad)[0]
    return int(row), int(col)

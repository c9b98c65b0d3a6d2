"""Numbers -> words, exactly as the paper writes them.

Values are first quantised to integers (``round(x * 10**decimals)``) and the text is rendered
from those integers. The text is therefore an exact function of the quantised row, which is
what lets the feature cache key on quantised rows instead of on float bits.
"""

from __future__ import annotations

import numpy as np

# |x| * 10**decimals must stay exactly representable: float64 holds integers up to 2**53.
_MAX_EXACT = float(2**53)

# Sentinels for non-finite values in quantised rows (never produced by finite values,
# which are bounded by _MAX_EXACT).
NAN_CODE = np.iinfo(np.int64).min
POSINF_CODE = np.iinfo(np.int64).max
NEGINF_CODE = np.iinfo(np.int64).min + 1


def quantize(values: np.ndarray, decimals: np.ndarray) -> np.ndarray:
    """Quantise a batch (N, D) with per-dimension ``decimals`` (D,) to int64 codes.

    Non-finite values get sentinel codes; the caller decides whether they are allowed.
    Raises ``OverflowError`` naming the column when a finite value is too large.
    """
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = values * (10.0 ** decimals.astype(np.float64))
    finite = np.isfinite(values)
    # A finite value whose scaled form overflows to inf must not be written as "inf".
    too_large = finite & ~(np.abs(scaled) < _MAX_EXACT)
    if too_large.any():
        row, col = np.argwhere(too_large)[0]
        raise OverflowError(
            f"value {float(values[row, col])!r} in column {col} is too large to write with "
            f"{int(decimals[col])} decimals"
        )
    codes = np.empty(values.shape, dtype=np.int64)
    codes[finite] = np.rint(scaled[finite]).astype(np.int64)
    codes[np.isnan(values)] = NAN_CODE
    codes[np.isposinf(values)] = POSINF_CODE
    codes[np.isneginf(values)] = NEGINF_CODE
    return codes


def is_special(code: int) -> bool:
    """Whether a code is one of the non-finite sentinels (never a finite value's code)."""
    return code in (NAN_CODE, POSINF_CODE, NEGINF_CODE)


def render(code: int, decimals: int) -> str:
    """Write one finite code: at most ``decimals`` decimals, trailing zeros dropped, one kept.

    ``render(143, 4) == "0.0143"``, ``render(10000000, 5) == "100.0"``; ``-0`` is ``"0.0"``.
    A sentinel code is refused: it stands for NaN/inf, whose words are the description's.
    """
    if is_special(code) or abs(code) >= _MAX_EXACT:
        raise ValueError(f"code {code} is not the code of a finite value")
    sign = "-" if code < 0 else ""
    magnitude = -code if code < 0 else code
    if decimals == 0:
        return f"{sign}{magnitude}"
    whole, fraction = divmod(magnitude, 10**decimals)
    digits = f"{fraction:0{decimals}d}".rstrip("0") or "0"
    return f"{sign}{whole}.{digits}"

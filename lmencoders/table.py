"""Vectorised exact-match tables: integer rows -> values, with no Python loop per row.

Rows are hashed to 64 bits (multiply-xorshift over the columns), kept sorted, and looked up
with ``searchsorted``; every candidate is then compared column by column, so a hash collision
can only ever cause a miss, never a wrong answer.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["row_hashes", "float_bits", "RowIndex", "FeatureTable", "table_budget", "TABLE_BUDGET"]

TABLE_BUDGET = "LMENCODERS_TABLE_BUDGET"
_DEFAULT_BUDGET = 4 << 30  # bytes of feature rows kept in RAM before they go to a mapped file
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def table_budget() -> int:
    """Bytes of feature rows a table keeps in RAM: ``$LMENCODERS_TABLE_BUDGET`` (a number of
    bytes, or with K/M/G/T), default 4 GiB. A larger table lives in a memory-mapped file."""
    text = os.environ.get(TABLE_BUDGET)
    if not text:
        return _DEFAULT_BUDGET
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(f"{TABLE_BUDGET}={text!r}: give bytes, e.g. 2G, 512M or 1000000")
    unit = match[2].lower()
    return int(float(match[1]) * 1024 ** ("kmgt".index(unit) + 1 if unit else 0))


def _mapped_rows(folder: Path, capacity: int, width: int, dtype: np.dtype) -> np.ndarray:
    """A zeroed ``(capacity, width)`` array backed by a file in ``folder``. The file is
    unlinked at once: the mapping keeps it alive, and no process, even one killed, leaves it
    behind."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="feature-table.", suffix=".tmp", dir=folder)
    try:
        os.close(fd)
        return np.memmap(name, dtype=dtype, mode="w+", shape=(capacity, width))
    finally:
        os.unlink(name)


_MIX = np.random.default_rng(0x5EED).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash per int64 row."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    multipliers = np.resize(_MIX, rows.shape[1])
    with np.errstate(over="ignore"):
        mixed = rows.view(np.uint64) * multipliers
        mixed ^= mixed >> np.uint64(31)
        h = mixed.sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    return h


def float_bits(values: np.ndarray) -> np.ndarray:
    """The exact float32 bit patterns of a batch, as int64 rows (for exact-match keys)."""
    return np.ascontiguousarray(values, dtype=np.float32).view(np.int32).astype(np.int64)


class RowIndex:
    """int64 rows -> int64 values."""

    def __init__(self, width: int) -> None:
        self._hashes = np.empty(0, dtype=np.uint64)  # sorted
        self._keys = np.empty((0, width), dtype=np.int64)  # aligned with _hashes
        self._values = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._hashes)

    def lookup(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row: whether it is stored, and its value (meaningful only where stored)."""
        hashes = row_hashes(rows)
        if not len(self):
            return np.zeros(len(rows), dtype=bool), np.zeros(len(rows), dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._hashes, hashes), len(self) - 1)
        found = self._hashes[pos] == hashes
        found[found] = (self._keys[pos[found]] == rows[found]).all(axis=1)
        return found, self._values[pos]

    def absent(self, rows: np.ndarray) -> np.ndarray:
        """Rows not stored yet, counting only the first of rows that share a hash."""
        found, _ = self.lookup(rows)
        new = np.flatnonzero(~found)
        _, first = np.unique(row_hashes(rows[new]), return_index=True)
        mask = np.zeros(len(rows), dtype=bool)
        mask[new[first]] = True
        return mask

    def insert(self, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Store rows not stored yet; returns the mask of rows stored now."""
        stored = self.absent(rows)
        rows, values = rows[stored], values[stored]
        hashes = row_hashes(rows)
        order = np.argsort(hashes)  # np.insert keeps input order within one gap
        rows, values, hashes = rows[order], values[order], hashes[order]
        pos = np.searchsorted(self._hashes, hashes)
        self._hashes = np.insert(self._hashes, pos, hashes)
        self._keys = np.insert(self._keys, pos, rows, axis=0)
        self._values = np.insert(self._values, pos, values)
        return stored


class FeatureTable:
    """Quantised observation rows -> feature rows (append-only store behind a RowIndex).

    Each stored row also keeps one raw float32 observation that produced it, from which the
    exact scaled inputs that d3rlpy will feed the encoders can be recomputed. Features may be
    stored as float16 where that is exact enough (per-piece features: see benchmarks).
    """

    def __init__(
        self,
        key_width: int,
        feature_size: int,
        max_rows: int = 5_000_000,
        dtype: np.dtype | type = np.float32,
        spill_dir: str | Path | None = None,
    ) -> None:
        self.max_rows = max_rows
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.index = RowIndex(key_width)
        self._features = np.empty((0, feature_size), dtype=dtype)
        self._raw = np.empty((0, key_width), dtype=np.float32)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def lookup(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row: whether it is stored, and its position (valid only where stored)."""
        return self.index.lookup(codes)

    def insert(
        self, codes: np.ndarray, features: np.ndarray, raw: np.ndarray | None = None
    ) -> None:
        """Store rows not stored yet; rows beyond ``max_rows`` are not kept."""
        keep = np.flatnonzero(self.index.absent(codes))[: max(self.max_rows - self._size, 0)]
        self.index.insert(codes[keep], self._size + np.arange(len(keep)))
        end = self._size + len(keep)
        self._grow(end)
        self._features[self._size : end] = features[keep]
        self._raw[self._size : end] = np.nan if raw is None else raw[keep]
        self._size = end

    def _grow(self, needed: int) -> None:
        if needed <= len(self._features):
            return
        capacity = max(needed, 2 * len(self._features), 1024)
        for name in ("_features", "_raw"):
            old = getattr(self, name)
            nbytes = capacity * old.shape[1] * old.itemsize
            if name == "_features" and self.spill_dir is not None and nbytes > table_budget():
                new = _mapped_rows(self.spill_dir, capacity, old.shape[1], old.dtype)
            else:
                new = np.empty((capacity, old.shape[1]), dtype=old.dtype)
            new[: self._size] = old[: self._size]
            setattr(self, name, new)

    @property
    def mapped(self) -> bool:
        """Whether the feature rows live in a memory-mapped file (past the RAM budget)."""
        return isinstance(self._features, np.memmap)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """Feature rows as float32, whatever the storage type. torch converts float16 rows
        (exactly, as numpy does) about 10x faster than numpy's ``astype``, which cost a
        third of a FinRL segments update (benchmarks/README.md section 7)."""
        rows = self._features[positions]
        if rows.dtype == np.float32:
            return rows
        return torch.from_numpy(rows).float().numpy()

    @property
    def dtype(self) -> np.dtype:
        return self._features.dtype

    @property
    def nbytes(self) -> int:
        """Memory held by the stored feature rows."""
        return self._size * self._features.itemsize * self._features.shape[1]

    def raw_rows(self) -> np.ndarray:
        """One raw observation per stored row (NaN where none was given), in position order."""
        return self._raw[: self._size]

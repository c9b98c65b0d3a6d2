"""Frozen LM features on disk, keyed by everything that decides them.

A cache file holds the quantised observation rows of a dataset and their features. Its name and
its stored metadata carry the LM weights sha256, the description fingerprint, the pooling, the
token window and the sha256 of the dataset's (unique, quantised) rows; a checksum covers the
arrays. A file that cannot be used for any reason (unreadable, empty, truncated, stale
metadata, checksum failure, shapes or rows that disagree with its key, non-finite features) is
reported and rebuilt, never used. Files are written to a temporary name and renamed, so an
interrupted write never leaves a file that looks complete; temporaries of writers that died
are removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from .files import atomic_write, remove_orphaned_temporaries

__all__ = ["CacheKey", "default_cache_dir", "save_features", "load_features", "dataset_sha256"]


def default_cache_dir() -> Path:
    """``$LMENCODERS_CACHE`` or ``~/.cache/lmencoders``."""
    root = os.environ.get("LMENCODERS_CACHE") or Path.home() / ".cache" / "lmencoders"
    return Path(root)


def dataset_sha256(unique_codes: np.ndarray) -> str:
    """Content hash of a dataset: its sorted unique quantised rows (order and copies ignored)."""
    digest = hashlib.sha256(str(unique_codes.shape).encode())
    digest.update(np.ascontiguousarray(unique_codes).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class CacheKey:
    lm_sha256: str
    description_sha256: str
    pooling: str
    max_length: int | None
    data_sha256: str
    precision: str = "float32"

    def filename(self) -> str:
        window = self.max_length or "auto"
        return (
            f"features-lm{self.lm_sha256[:12]}-desc{self.description_sha256[:12]}-"
            f"{self.pooling}-{window}-data{self.data_sha256[:16]}"
            + ("" if self.precision == "float32" else f"-{self.precision}")
            + ".npz"
        )


def _checksum(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def save_features(
    path: Path, key: CacheKey, codes: np.ndarray, features: np.ndarray, raw: np.ndarray
) -> Path:
    """Write quantised rows, their features and one raw observation each, atomically: a
    temporary file in the same folder, then ``os.replace``."""
    meta = json.dumps(dataclasses.asdict(key), sort_keys=True)
    arrays = {
        "codes": codes,
        "features": features,
        "raw": raw,
        "meta": np.array(meta),
        "checksum": np.array(_checksum(codes, features, raw)),
    }
    remove_orphaned_temporaries(Path(path).parent)
    return atomic_write(path, lambda f: np.savez(f, **arrays))


class _Unusable(Exception):
    """Why a cache file cannot be used (the message is shown in the rebuild warning)."""


def _read(path: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, str]:
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = data["codes"], data["features"], data["raw"]
            return meta, *arrays, str(data["checksum"])
    except Exception as exc:  # any way a file can be broken: empty, truncated, garbage
        raise _Unusable(f"is unreadable ({type(exc).__name__}: {exc})") from None


def _check(
    key: CacheKey,
    feature_size: int,
    meta: dict,
    codes: np.ndarray,
    features: np.ndarray,
    raw: np.ndarray,
    checksum: str,
) -> None:
    expected = dataclasses.asdict(key)
    if meta != expected:
        changed = sorted(k for k in meta.keys() | expected.keys() if meta.get(k) != expected.get(k))
        raise _Unusable(f"is stale ({', '.join(changed)} differ)")
    if _checksum(codes, features, raw) != checksum:
        raise _Unusable("is corrupt (checksum mismatch)")
    rows = len(codes)
    shapes_ok = (
        codes.ndim == 2
        and codes.dtype == np.int64
        and features.shape == (rows, feature_size)
        and features.dtype == np.float32
        and raw.shape == codes.shape
    )
    if not shapes_ok:
        raise _Unusable(
            f"has shapes that disagree with its key (codes {codes.shape} {codes.dtype}, "
            f"features {features.shape} {features.dtype}, raw {raw.shape}; expected "
            f"{feature_size} features per row)"
        )
    if dataset_sha256(codes) != key.data_sha256:
        raise _Unusable("holds other rows than its key names")
    if not np.isfinite(features).all():
        raise _Unusable("holds non-finite features")


def load_features(
    path: Path, key: CacheKey, feature_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached (codes, features, raw), or ``None`` if missing; ``None`` with a warning if
    the file cannot be used (it is then rebuilt by the caller and replaced atomically)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        meta, codes, features, raw, checksum = _read(path)
        _check(key, feature_size, meta, codes, features, raw, checksum)
    except _Unusable as problem:
        warnings.warn(f"feature cache {path} {problem}; rebuilding it", stacklevel=2)
        return None
    return codes, features, raw

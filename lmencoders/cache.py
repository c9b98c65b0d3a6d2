"""Frozen LM features on disk, keyed by everything that decides them.

A cache file holds the quantised observation rows of a dataset and their features. Its name and
its stored metadata carry the LM weights sha256, the description fingerprint, the pooling, the
token window and the sha256 of the dataset's (unique, quantised) rows; a checksum covers the
arrays. A file whose metadata differ (stale) or whose checksum fails (corrupt) is reported and
rebuilt, never used. Files are written to a temporary name and renamed, so an interrupted write
never leaves a file that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from .files import atomic_write

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

    def filename(self) -> str:
        window = self.max_length or "auto"
        return (
            f"features-lm{self.lm_sha256[:12]}-desc{self.description_sha256[:12]}-"
            f"{self.pooling}-{window}-data{self.data_sha256[:16]}.npz"
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
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_features(path: Path, key: CacheKey) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached (codes, features, raw), or ``None`` with a warning if missing, stale or
    corrupt."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            codes, features, raw = data["codes"], data["features"], data["raw"]
            checksum = str(data["checksum"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        warnings.warn(f"feature cache {path} is unreadable ({exc}); rebuilding it", stacklevel=2)
        return None
    if meta != dataclasses.asdict(key):
        changed = sorted(
            k
            for k in meta.keys() | dataclasses.asdict(key).keys()
            if meta.get(k) != dataclasses.asdict(key).get(k)
        )
        warnings.warn(
            f"feature cache {path} is stale ({', '.join(changed)} differ); rebuilding it",
            stacklevel=2,
        )
        return None
    if _checksum(codes, features, raw) != checksum:
        warnings.warn(
            f"feature cache {path} is corrupt (checksum mismatch); rebuilding it", stacklevel=2
        )
        return None
    return codes, features, raw

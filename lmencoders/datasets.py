"""Reading observations out of dataset files (NeoRL ``.npz`` or d3rlpy ``.h5``)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import LMEncodersError

__all__ = ["DatasetFileError", "read_observations"]


class DatasetFileError(LMEncodersError, ValueError):
    """A dataset file is missing, unreadable or lacks what is needed."""


def read_observations(path: str | Path) -> np.ndarray:
    """Every observation a dataset file holds (``obs`` and ``next_obs`` for NeoRL ``.npz``;
    episode observations for a d3rlpy ``.h5`` written by ``ReplayBuffer.dump``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFileError(f"{path}: no such dataset file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                if "obs" not in data:
                    raise DatasetFileError(f"{path}: no 'obs' array (keys: {sorted(data.keys())})")
                parts = [data["obs"]] + ([data["next_obs"]] if "next_obs" in data else [])
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DatasetFileError(f"{path}: unreadable .npz file ({exc})") from None
        return np.concatenate([np.asarray(p).reshape(len(p), -1) for p in parts])
    if path.suffix in {".h5", ".hdf5"}:
        import d3rlpy

        try:
            with open(path, "rb") as f:
                buffer = d3rlpy.dataset.ReplayBuffer.load(f, d3rlpy.dataset.InfiniteBuffer())
        except (OSError, KeyError, ValueError) as exc:
            raise DatasetFileError(f"{path}: unreadable d3rlpy dataset ({exc})") from None
        return np.concatenate([ep.observations for ep in buffer.episodes])
    raise DatasetFileError(f"{path}: unknown dataset format (expected .npz or .h5)")

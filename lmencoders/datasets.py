"""NeoRL datasets from local files in NeoRL's own layout, checked against NeoRL's md5 index.

A NeoRL file ``<Task>-<level>-<N>-<train|val>[-noise].npz`` holds ``obs``, ``next_obs``,
``action``, ``reward`` (N, 1), ``done`` and ``index``: the start offset of every trajectory but
the first (NeoRL drops the leading 0 and stores it as float). ``train_num`` keeps the first
trajectories, as NeoRL does (v1 names 99/999/9999 read the 100/1000/10000 files).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import zipfile
from pathlib import Path

import numpy as np

from .errors import LMEncodersError

__all__ = [
    "DatasetFileError",
    "NeoRLData",
    "neorl_file_name",
    "load_neorl",
    "read_neorl_file",
    "to_mdp_dataset",
    "read_observations",
]

KEYS = ("obs", "next_obs", "action", "reward", "done", "index")
LEVELS = ("low", "medium", "high", "expert")
_V1_NAMES = {99: 100, 999: 1000, 9999: 10000}


class DatasetFileError(LMEncodersError, ValueError):
    """A dataset file is missing, unreadable, corrupt or not in the expected layout."""


@functools.lru_cache(maxsize=1)
def neorl_md5_index() -> dict[str, str]:
    """NeoRL's file name -> md5 index (copied from NeoRL's ``data_map.json``)."""
    return json.loads((Path(__file__).parent / "neorl_md5.json").read_text())


def neorl_file_name(task: str, level: str, size: int, split: str = "train") -> str:
    """NeoRL's file name: ``("Hopper-v3", "low", 99)`` -> ``Hopper-v3-low-100-train-noise.npz``."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {LEVELS}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    size = _V1_NAMES.get(size, size)
    base = f"{task}-{level}-{size}-{split}"
    index = neorl_md5_index()
    for name in (f"{base}-noise.npz", f"{base}.npz"):
        if name in index:
            return name
    return f"{base}.npz"  # a file made by our collector, not in NeoRL's index


@dataclasses.dataclass
class NeoRLData:
    """One split of a NeoRL dataset, arrays as NeoRL's ``get_dataset`` returns them
    (``index`` with its leading 0, as integers)."""

    obs: np.ndarray
    next_obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    done: np.ndarray
    index: np.ndarray
    source: str = ""

    @property
    def num_trajectories(self) -> int:
        return len(self.index)

    def trajectory_bounds(self) -> list[tuple[int, int]]:
        ends = list(self.index[1:]) + [len(self.obs)]
        return list(zip(self.index.tolist(), [int(e) for e in ends]))

    def returns(self) -> np.ndarray:
        return np.array([self.reward[a:b].sum() for a, b in self.trajectory_bounds()])

    def first(self, trajectories: int) -> NeoRLData:
        """The first ``trajectories`` trajectories (NeoRL's ``train_num``)."""
        if trajectories > self.num_trajectories:
            raise DatasetFileError(
                f"{self.source}: asked for {trajectories} trajectories, the file has "
                f"{self.num_trajectories}"
            )
        end = (
            int(self.index[trajectories]) if trajectories < self.num_trajectories else len(self.obs)
        )
        arrays = {k: getattr(self, k)[:end] for k in KEYS if k != "index"}
        return NeoRLData(**arrays, index=self.index[:trajectories], source=self.source)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_neorl_file(path: str | Path, verify: bool = True) -> NeoRLData:
    """Read one NeoRL-layout ``.npz``; with ``verify``, a file named in NeoRL's index must
    have NeoRL's md5."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFileError(f"{path}: no such dataset file")
    expected = neorl_md5_index().get(path.name)
    if verify and expected is not None:
        actual = _md5(path)
        if actual != expected:
            raise DatasetFileError(
                f"{path}: md5 {actual} does not match NeoRL's {expected} for {path.name} "
                f"(corrupt or truncated download?)"
            )
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in KEYS if k not in data]
            if missing:
                raise DatasetFileError(
                    f"{path}: not a NeoRL dataset: missing {missing} (has {sorted(data.keys())})"
                )
            arrays = {k: np.asarray(data[k]) for k in KEYS}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetFileError(f"{path}: unreadable .npz file ({exc})") from None
    n = len(arrays["obs"])
    for key in ("next_obs", "action", "reward", "done"):
        if len(arrays[key]) != n:
            raise DatasetFileError(f"{path}: '{key}' has {len(arrays[key])} rows, 'obs' has {n}")
    if arrays["reward"].ndim != 2:
        raise DatasetFileError(
            f"{path}: 'reward' must have shape (N, 1), got {arrays['reward'].shape}"
        )
    index = np.concatenate([[0], arrays["index"].reshape(-1)]).astype(np.int64)
    if (np.diff(index) <= 0).any() or index[-1] >= max(n, 1):
        raise DatasetFileError(f"{path}: 'index' is not increasing within 0..{n - 1}")
    arrays["index"] = index
    arrays["done"] = arrays["done"].reshape(-1).astype(bool)
    return NeoRLData(**arrays, source=str(path))


def _polixir_neorl():
    """Polixir's NeoRL if installed (PyPI's package of the same name is another project)."""
    try:
        module = importlib.import_module("neorl")
    except ImportError:
        return None
    return module if hasattr(module, "make") and hasattr(module, "neorl_envs") else None


def load_neorl(
    task: str,
    level: str = "low",
    train_num: int = 99,
    data_dir: str | Path | None = None,
    need_val: bool = False,
    verify: bool = True,
) -> NeoRLData | tuple[NeoRLData, NeoRLData]:
    """Load a NeoRL dataset: from ``data_dir`` (files in NeoRL's names), or through Polixir's
    ``neorl`` package when no ``data_dir`` is given and it is installed."""
    if data_dir is None:
        neorl = _polixir_neorl()
        if neorl is None:
            raise DatasetFileError(
                "give data_dir= (a folder with NeoRL's .npz files); Polixir's neorl package is "
                "not installed (the PyPI package named neorl is an unrelated project)"
            )
        train, val = neorl.make(task).get_dataset(
            data_type=level, train_num=train_num, need_val=True
        )
        as_data = [
            NeoRLData(**{k: np.asarray(d[k]) for k in KEYS}, source="neorl") for d in (train, val)
        ]
        return tuple(as_data) if need_val else as_data[0]
    folder = Path(data_dir)
    train = read_neorl_file(folder / neorl_file_name(task, level, train_num), verify).first(
        train_num
    )
    if not need_val:
        return train
    val_size = {99: 10, 100: 10, 999: 100, 1000: 100, 9999: 1000, 10000: 1000}.get(train_num, 10)
    val = read_neorl_file(folder / neorl_file_name(task, level, val_size, "val"), verify)
    return train, val


def to_mdp_dataset(data: NeoRLData):
    """A d3rlpy MDPDataset with NeoRL's trajectories: a trajectory ending in ``done`` is
    terminal; any other ends by time-out, and its last ``next_obs`` is kept as a final
    observation so that no transition is lost."""
    import d3rlpy

    obs, actions, rewards, terminals, timeouts = [], [], [], [], []
    for start, end in data.trajectory_bounds():
        done = bool(data.done[end - 1])
        if data.done[start : end - 1].any():
            raise DatasetFileError(f"{data.source}: 'done' inside trajectory at {start}..{end}")
        obs.append(data.obs[start:end])
        actions.append(data.action[start:end])
        rewards.append(data.reward[start:end, 0])
        term = np.zeros(end - start, bool)
        term[-1] = done
        stop = np.zeros(end - start, bool)
        if not done:  # append the final next observation with a never-used action/reward
            obs.append(data.next_obs[end - 1 : end])
            actions.append(np.zeros_like(data.action[:1]))
            rewards.append(np.zeros(1, dtype=data.reward.dtype))
            term = np.append(term, False)
            stop = np.append(stop, True)
        terminals.append(term)
        timeouts.append(stop)
    return d3rlpy.dataset.MDPDataset(
        np.concatenate(obs).astype(np.float32),
        np.concatenate(actions).astype(np.float32),
        np.concatenate(rewards).astype(np.float32),
        np.concatenate(terminals),
        np.concatenate(timeouts),
        action_space=d3rlpy.ActionSpace.CONTINUOUS,
    )


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

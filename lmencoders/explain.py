"""Which words the policy reads: a weight per piece of the description, for actor and critic.

With ``pooling="segments"`` the readout's attention says it directly: the weight each query
gives each piece, averaged over queries and over the dataset's observations. For mean- or
CLS-pooled encoders (frozen or tuned), gradient x input says it: how much each piece's input
token embeddings move the actor's ||action||^2 and the critic's Q(s, a), as
|gradient . embedding| summed over the piece's tokens, normalised per observation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checks import positive
from .datasets import load_dataset
from .encoders import TextFeatures
from .errors import ConfigError
from .saving import load_model

__all__ = ["Explanation", "explain", "draw", "format_table"]


@dataclasses.dataclass
class Explanation:
    run: str
    method: str  # "readout attention" or "gradient x input"
    labels: list[str]
    weights: dict[str, np.ndarray]  # "actor" / "critic" -> (pieces,) mean weight per piece
    observations: int

    def to_record(self) -> dict:
        """Plain JSON values (a run's ledger record keeps its explanation)."""
        return dataclasses.asdict(self) | {
            "weights": {part: [float(w) for w in ws] for part, ws in self.weights.items()}
        }

    @classmethod
    def from_record(cls, record: dict) -> Explanation:
        weights = {part: np.asarray(ws, dtype=np.float64) for part, ws in record["weights"].items()}
        return cls(**(record | {"weights": weights}))


def _lm_features(module: torch.nn.Module) -> TextFeatures:
    features = getattr(getattr(module, "_encoder", None), "features", None)
    if not isinstance(features, TextFeatures):
        raise ConfigError(f"{type(module).__name__} has no LM encoder to explain")
    return features


def _readout_weights(features: TextFeatures, x: torch.Tensor) -> np.ndarray:
    assert features.readout is not None
    with torch.no_grad():
        weights = features.readout.weights(features.lm_features(x))
    return weights.mean(dim=(0, 1)).cpu().numpy()


def _gradient_weights(
    features: TextFeatures, x: torch.Tensor, raw: np.ndarray, output: Any, batch: int = 16
) -> np.ndarray:
    lm, parameters, _ = features.lm_and_parameters(x.device)
    description = features.description
    parts = []
    for start in range(0, len(raw), batch):
        rows = slice(start, start + batch)

        def score(pooled: torch.Tensor, rows: slice = rows) -> torch.Tensor:
            with features.substituted(pooled):
                return output(x[rows], rows)

        parts.append(
            lm.piece_attribution(
                description.format_segments(raw[rows]),
                description.separator,
                score,
                pooling=features.pooling,
                max_length=features.max_length,
                parameters=parameters or None,
            )
        )
    return np.concatenate(parts).mean(axis=0)


def explain(
    model: str | Path, dataset: str | Path, *, rows: int = 64, seed: int = 0
) -> Explanation:
    """Weights per piece for a saved run (folder, ``model.pt`` or ``model.json``), averaged over
    ``rows`` observations drawn from ``dataset``."""
    rows = positive(rows, "rows")
    algo = load_model(model)
    data = load_dataset(dataset)
    observations = np.concatenate([ep.observations for ep in data.buffer.episodes])
    actions = np.concatenate([ep.actions for ep in data.buffer.episodes])
    pick = np.random.default_rng(seed).choice(
        len(observations), min(rows, len(observations)), False
    )
    raw, taken = observations[pick], actions[pick]
    device = algo.impl.device
    x = torch.as_tensor(raw, dtype=torch.float32, device=device)
    scaler = algo.config.observation_scaler
    if scaler is not None:
        x = scaler.transform(x)
    a = torch.as_tensor(taken, dtype=torch.float32, device=device)
    if algo.config.action_scaler is not None:
        a = algo.config.action_scaler.transform(a)
    modules = algo.impl.modules
    parts: dict[str, tuple[torch.nn.Module, Any]] = {}
    if hasattr(modules, "policy"):
        policy = modules.policy
        parts["actor"] = (policy, lambda xs, r: policy(xs).squashed_mu.square().sum(dim=1))
    if hasattr(modules, "q_funcs"):
        critic = modules.q_funcs[0]
        parts["critic"] = (critic, lambda xs, r: critic(xs, a[r]).q_value.view(-1))
    if not parts:
        raise ConfigError(f"{type(algo).__name__} has neither a policy nor critics to explain")
    weights, method, labels = {}, "", []
    for name, (module, output) in parts.items():
        features = _lm_features(module)
        labels = features.description.segment_labels
        if features.readout is not None:
            method, weights[name] = "readout attention", _readout_weights(features, x)
        else:
            method = "gradient x input"
            weights[name] = _gradient_weights(features, x, raw, output)
    path = Path(model)
    run = (path if path.is_dir() else path.parent).name
    return Explanation(run, method, labels, weights, len(raw))


def format_table(explanation: Explanation) -> str:
    """Pieces sorted by the actor's weight (or the first part's), one column per part."""
    names = list(explanation.weights)
    order = np.argsort(-explanation.weights[names[0]])
    lines = ["| piece | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i in order:
        cells = " | ".join(f"{explanation.weights[n][i]:.3f}" for n in names)
        lines.append(f"| {explanation.labels[i]} | {cells} |")
    return "\n".join(lines)


def draw(explanation: Explanation, path: str | Path) -> Path:
    """A horizontal bar chart per part (actor, critic), pieces sorted by weight, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(explanation.weights)
    height = max(3.0, 0.28 * len(explanation.labels) + 1.5)
    figure, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), height), squeeze=False)
    for axis, name in zip(axes[0], names):
        values = explanation.weights[name]
        order = np.argsort(values)
        axis.barh([explanation.labels[i] for i in order], values[order], color="tab:blue")
        axis.set_title(name)
        axis.set_xlabel(f"mean weight per piece ({explanation.method})")
        axis.tick_params(axis="y", labelsize=8)
    figure.suptitle(f"{explanation.run}: what the policy reads ({explanation.observations} obs)")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

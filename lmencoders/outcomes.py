"""Outcomes as text: what a stretch of a trajectory did, written with its state description.

An outcome of transitions ``[start, end)`` reads its first state, its last state (the state
after the last action), the change of every dimension, and, optionally, the lowest and highest
value each dimension took on the way, so that objectives about the whole stretch ("keeps the
torso upright") can be judged as well as those about where it ended.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .checks import positive
from .datasets import NeoRLData
from .description import StateDescription

__all__ = [
    "Span",
    "trajectory_spans",
    "window_spans",
    "span_states",
    "outcome_text",
    "outcome_texts",
]


@dataclasses.dataclass(frozen=True)
class Span:
    """Transitions ``[start, end)`` of trajectory ``trajectory`` (rows of the dataset)."""

    trajectory: int
    start: int
    end: int


def trajectory_spans(data: NeoRLData) -> list[Span]:
    """One span per trajectory (Kwon et al.'s granularity: the reward goes on its end)."""
    return [Span(t, a, b) for t, (a, b) in enumerate(data.trajectory_bounds())]


def window_spans(data: NeoRLData, window: int) -> list[Span]:
    """Consecutive windows of ``window`` transitions within each trajectory (a trajectory's
    last window may be shorter)."""
    window = positive(window, "window")
    return [
        Span(t, s, min(s + window, b))
        for t, (a, b) in enumerate(data.trajectory_bounds())
        for s in range(a, b, window)
    ]


def span_states(data: NeoRLData, span: Span) -> np.ndarray:
    """The states a span passes through: ``obs[start:end]`` then ``next_obs[end - 1]``."""
    return np.concatenate([data.obs[span.start : span.end], data.next_obs[span.end - 1][None]])


def outcome_text(description: StateDescription, states: np.ndarray, *, ranges: bool = True) -> str:
    """The outcome of a sequence of states ``(T, D)``, T >= 2, in the description's words."""
    states = np.asarray(states, dtype=np.float64)
    first, last = states[0], states[-1]
    rows = [first, last, last - first]
    names = ["Start", "End", "Change"]
    if ranges:
        rows += [states.min(0), states.max(0)]
        names += ["Lowest", "Highest"]
    texts = description.format(np.stack(rows))
    lines = [f"{name}: {text}" for name, text in zip(names, texts)]
    lines.append(f"Steps: {len(states) - 1}")
    return "\n".join(lines)


def outcome_texts(
    description: StateDescription, data: NeoRLData, spans: Sequence[Span], *, ranges: bool = True
) -> list[str]:
    """:func:`outcome_text` of every span's :func:`span_states`."""
    return [outcome_text(description, span_states(data, s), ranges=ranges) for s in spans]

"""Statistics the field uses for RL results (Agarwal et al., NeurIPS 2021, via ``rliable``).

Per task and overall: the interquartile mean (IQM) and mean of the runs' scores with
stratified-bootstrap 95% confidence intervals, and the probability of improvement
P(method > baseline) with its interval. A task's score is NeoRL's normalised score where NeoRL
has references, else the raw return; the overall aggregate takes only the tasks with
normalised scores (raw returns of different tasks are not on one scale) and the seeds every
such task has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Interval",
    "Scores",
    "scores_by_task",
    "aggregates",
    "improvement",
    "runs",
    "verdict",
    "curve_band",
    "interquartile_mean",
    "iqm_and_mean",
    "probability_of_improvement",
]

CONFIDENCE = 0.95
REPS = 5_000  # bootstrap replications (rliable's examples use 2,000 to 50,000)
CURVE_REPS = 2_000  # per learning curve: a band to look at, not a number to quote
MIN_RUNS = 3  # runs per method and task before an interval is read as a verdict
SEED = 0  # the bootstrap's random state: the same runs give the same intervals


@dataclasses.dataclass(frozen=True)
class Interval:
    point: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.point:.2f} [{self.low:.2f}, {self.high:.2f}]"


@dataclasses.dataclass
class Scores:
    """One task's scores: method -> {seed: score}, and whether they are normalised."""

    task: str
    normalised: bool
    by_method: dict[str, dict[int, float]]


def scores_by_task(rows: Sequence[Mapping]) -> dict[str, Scores]:
    """Group result rows (``dataset``, ``method``, ``seed``, ``mean_return``,
    ``normalized_score``) into per-task score tables."""
    tasks: dict[str, Scores] = {}
    for row in rows:
        normalised = row["normalized_score"] is not None
        task = tasks.setdefault(row["dataset"], Scores(row["dataset"], normalised, {}))
        value = row["normalized_score"] if task.normalised else row["mean_return"]
        task.by_method.setdefault(row["method"], {})[int(row["seed"])] = float(value)
    return tasks


def _matrix(tasks: Sequence[Scores], method: str) -> np.ndarray | None:
    """(runs x tasks) scores of ``method`` on the seeds every task has; None if absent."""
    if not all(method in t.by_method for t in tasks):
        return None
    seeds = sorted(set.intersection(*(set(t.by_method[method]) for t in tasks)))
    if not seeds:
        return None
    return np.array([[t.by_method[method][s] for t in tasks] for s in seeds])


def _intervals(score_dict: dict, func: Any, reps: int | None = None) -> dict[str, list[Interval]]:
    """rliable's stratified bootstrap (percentile intervals), seeded. rliable draws its
    resamples from NumPy's global generator, so that is seeded here and restored after."""
    from rliable import library

    result = {}
    state = np.random.get_state()
    try:
        np.random.seed(SEED)
        for key, scores in score_dict.items():
            result[key] = _interval(library, scores, func, reps)
    finally:
        np.random.set_state(state)
    return result


def _interval(library: Any, scores: Any, func: Any, reps: int | None) -> list[Interval]:
    """Point estimate and interval of ``func`` on (runs x tasks) scores, or on a list of such
    matrices bootstrapped independently (probability of improvement)."""
    if isinstance(scores, np.ndarray):
        bootstrap, point = library.StratifiedBootstrap(scores), func(scores)
    else:
        bootstrap, point = library.StratifiedIndependentBootstrap(*scores), func(*scores)
    low, high = bootstrap.conf_int(func, reps=reps or REPS, size=CONFIDENCE, method="percentile")
    return [
        Interval(float(p), float(lo), float(hi))
        for p, lo, hi in zip(np.atleast_1d(point), np.atleast_1d(low), np.atleast_1d(high))
    ]


def aggregates(tasks: Sequence[Scores], methods: Sequence[str]) -> dict[str, dict[str, Interval]]:
    """method -> {"IQM": interval, "mean": interval} over the runs x tasks matrix."""
    matrices = {m: x for m in methods if (x := _matrix(tasks, m)) is not None}
    if not matrices:
        return {}

    return {
        method: dict(zip(("IQM", "mean"), values))
        for method, values in _intervals(matrices, iqm_and_mean).items()
    }


def improvement(tasks: Sequence[Scores], method: str, baseline: str) -> Interval | None:
    """P(method > baseline): Mann-Whitney's probability that a run of ``method`` scores above
    a run of ``baseline`` on the same task, averaged over tasks, with its interval."""
    x, y = _matrix(tasks, method), _matrix(tasks, baseline)
    if x is None or y is None:
        return None
    return _intervals({"pair": [x, y]}, probability_of_improvement)["pair"][0]


# rliable's own metrics call scipy once per task and bootstrap replicate (trim_mean,
# mannwhitneyu), whose per-call checks cost 35-45x the arithmetic on a handful of runs: they
# were most of `lmencoders report`'s minutes (5,000 replicates per interval). These give the
# same numbers (tests/test_statistics.py checks them against rliable's) in NumPy alone.


def interquartile_mean(scores: np.ndarray) -> float:
    """rliable's ``aggregate_iqm``: the mean of the middle 50% of all runs x tasks scores
    (scipy's ``trim_mean`` with 25% cut off each end)."""
    ordered = np.sort(scores, axis=None)
    cut = int(0.25 * ordered.size)
    return float(ordered[cut : ordered.size - cut].mean())


def iqm_and_mean(scores: np.ndarray) -> np.ndarray:
    """rliable's ``aggregate_iqm`` and ``aggregate_mean`` (mean over runs, then tasks) of
    (runs x tasks) scores: the pair :func:`aggregates` bootstraps."""
    return np.array([interquartile_mean(scores), scores.mean(axis=0).mean()])


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """rliable's ``probability_of_improvement``: per task, the share of (run of X, run of Y)
    pairs that X wins, ties counting half (Mann-Whitney's U / (n_x n_y)), averaged over tasks;
    ``x`` and ``y`` are (runs x tasks)."""
    pairs_x, pairs_y = x[:, None, :], y[None, :, :]
    wins = (pairs_x > pairs_y).mean(axis=(0, 1)) + 0.5 * (pairs_x == pairs_y).mean(axis=(0, 1))
    return float(wins.mean())


def runs(tasks: Sequence[Scores], method: str) -> int:
    """How many of ``method``'s runs the statistics use per task (the seeds every task has)."""
    matrix = _matrix(tasks, method)
    return 0 if matrix is None else len(matrix)


def ready(task: Scores, methods: Sequence[str]) -> bool:
    """Whether every one of ``methods`` has ``MIN_RUNS`` runs on ``task``: the aggregate over
    tasks takes the seeds every task has, so one task with a single seed would make the
    whole aggregate a single run."""
    return all(len(task.by_method.get(m, {})) >= MIN_RUNS for m in methods)


def verdict(probability: Interval, method: str, baseline: str, fewest_runs: int) -> str:
    """What the interval of P(method > baseline) supports, in words; ``fewest_runs``: the
    fewer of the two methods' runs per task. Below ``MIN_RUNS`` a bootstrap interval is not
    evidence (one run against one gives [0, 0] or [1, 1]), so no side is taken."""
    if fewest_runs < MIN_RUNS:
        return f"too few runs for a verdict ({fewest_runs}; at least {MIN_RUNS} of each method)"
    if probability.low > 0.5:
        return f"{method} above {baseline} (the interval excludes 0.5)"
    if probability.high < 0.5:
        return f"{baseline} above {method} (the interval excludes 0.5)"
    return "no difference supported (the interval contains 0.5)"


def curve_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over runs of learning curves ``(runs, steps)`` and its 95% bootstrap interval at
    every step (a single run: the curve itself, no band)."""
    values = np.asarray(values, dtype=np.float64)
    mean = values.mean(0)
    if len(values) < 2:
        return mean, mean, mean

    def func(x: np.ndarray) -> np.ndarray:
        return x.mean(axis=0)[0]

    estimate = _intervals({"curve": values[:, None, :]}, func, reps=min(CURVE_REPS, REPS))["curve"]
    return mean, np.array([e.low for e in estimate]), np.array([e.high for e in estimate])

"""rliable statistics in the report, checked against direct computations."""

from __future__ import annotations

import numpy as np
import pytest

from lmencoders import statistics


def rows(method: str, dataset: str, returns: list[float], normalised: bool = True) -> list[dict]:
    return [
        {
            "dataset": dataset,
            "method": method,
            "seed": seed,
            "mean_return": value,
            "normalized_score": value / 10 if normalised else None,
        }
        for seed, value in enumerate(returns)
    ]


def test_scores_are_normalised_where_the_task_has_references():
    tasks = statistics.scores_by_task(
        rows("A", "hopper", [10.0, 20.0]) + rows("A", "finance", [3.0, 4.0], normalised=False)
    )
    assert tasks["hopper"].normalised and tasks["hopper"].by_method["A"] == {0: 1.0, 1: 2.0}
    assert not tasks["finance"].normalised and tasks["finance"].by_method["A"] == {0: 3.0, 1: 4.0}


def test_iqm_and_mean_with_intervals_match_direct_computations():
    a = [1.0, 2.0, 3.0, 4.0, 100.0, 5.0, 6.0, 7.0]
    task = statistics.scores_by_task(rows("A", "t", a, normalised=False))["t"]
    result = statistics.aggregates([task], ["A"])["A"]
    ordered = np.sort(a)
    assert result["IQM"].point == pytest.approx(ordered[2:6].mean())  # 25% cut off each end
    assert result["mean"].point == pytest.approx(np.mean(a))
    for interval in result.values():
        assert interval.low <= interval.point <= interval.high
    assert statistics.aggregates([task], ["A"]) == {"A": result}  # seeded bootstrap


def test_probability_of_improvement_is_the_share_of_winning_pairs():
    x, y = [3.0, 5.0, 7.0, 1.0], [2.0, 5.0, 4.0]
    tasks = statistics.scores_by_task(
        rows("X", "t", x, normalised=False) + rows("Y", "t", y, normalised=False)
    )
    # seeds every task has: X and Y are each taken on their own seeds (4 and 3)
    result = statistics.improvement([tasks["t"]], "X", "Y")
    wins = sum((a > b) + 0.5 * (a == b) for a in x for b in y) / (len(x) * len(y))
    assert result.point == pytest.approx(wins)
    assert 0.0 <= result.low <= result.point <= result.high <= 1.0


def test_the_numpy_metrics_give_rliables_numbers():
    """The bootstrap calls these instead of rliable's metrics (for speed): same numbers, ties
    and uneven run counts included."""
    from rliable import metrics

    rng = np.random.default_rng(0)
    for runs_x, runs_y, tasks in [(3, 3, 1), (5, 3, 4), (4, 6, 2), (1, 2, 3)]:
        x = rng.integers(0, 4, size=(runs_x, tasks)).astype(float)  # few values: many ties
        y = rng.integers(0, 4, size=(runs_y, tasks)).astype(float)
        assert statistics.probability_of_improvement(x, y) == pytest.approx(
            metrics.probability_of_improvement(x, y), abs=1e-12
        )
        assert statistics.probability_of_improvement(x, x) == pytest.approx(0.5)
        scores = rng.normal(size=(runs_x, tasks))
        assert statistics.interquartile_mean(scores) == pytest.approx(
            metrics.aggregate_iqm(scores), abs=1e-12
        )
        np.testing.assert_allclose(
            statistics.iqm_and_mean(scores),
            [metrics.aggregate_iqm(scores), metrics.aggregate_mean(scores)],
            atol=1e-12,
        )


def test_verdict_words_follow_the_interval():
    clear = statistics.scores_by_task(
        rows("LM", "t", [10, 11, 12, 13, 14]) + rows("TD3+BC", "t", [0, 1, 2, 3, 4])
    )["t"]
    p = statistics.improvement([clear], "LM", "TD3+BC")
    assert p.point == 1.0 and p.low == 1.0
    assert statistics.runs([clear], "LM") == 5
    assert statistics.verdict(p, "LM", "TD3+BC", 5).startswith("LM above TD3+BC")
    reverse = statistics.improvement([clear], "TD3+BC", "LM")
    assert statistics.verdict(reverse, "TD3+BC", "LM", 5).startswith("LM above TD3+BC")
    mixed = statistics.Interval(0.6, 0.3, 0.9)
    assert statistics.verdict(mixed, "LM", "TD3+BC", 5).startswith("no difference supported")


def test_no_verdict_from_too_few_runs():
    # one run against two: the bootstrap's interval is a point, [0, 0], which is no evidence
    few = statistics.scores_by_task(rows("LM", "t", [10]) + rows("TD3+BC", "t", [20, 30]))["t"]
    p = statistics.improvement([few], "LM", "TD3+BC")
    assert (p.low, p.high) == (0.0, 0.0) and statistics.runs([few], "LM") == 1
    assert statistics.verdict(p, "LM", "TD3+BC", 1).startswith("too few runs for a verdict (1;")
    assert statistics.verdict(p, "LM", "TD3+BC", 3).startswith("TD3+BC above LM")


def test_curve_band_holds_the_mean():
    curves = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 3.0], [3.0, 3.0, 3.0]])
    mean, low, high = statistics.curve_band(curves)
    np.testing.assert_allclose(mean, curves.mean(0))
    assert (low <= mean + 1e-9).all() and (mean <= high + 1e-9).all()
    assert low[2] == high[2] == 3.0  # every run agrees: no width
    single, lo, hi = statistics.curve_band(curves[:1])
    np.testing.assert_array_equal(lo, hi)


def test_aggregate_over_tasks_waits_for_tasks_with_too_few_runs(tmp_path):
    from lmencoders import report

    methods = ["TD3+BC", "TD3+BC LM-No-Tune"]
    grid = rows("TD3+BC", "a", [10, 20, 30]) + rows("TD3+BC LM-No-Tune", "a", [15, 25, 35])
    grid += rows("TD3+BC", "b", [50]) + rows("TD3+BC LM-No-Tune", "b", [5])
    text = report._statistics(tmp_path, grid, methods)
    overall = text[text.index("Over the") :]
    assert overall.startswith("Over the 1 tasks with normalised scores (a)")
    assert "3 runs there: b." in overall
    # on task a alone, three runs each: a verdict can be read
    assert "too few runs" not in overall.split("![intervals]")[0]
    assert (tmp_path / "intervals.png").exists()
    assert statistics.ready(statistics.scores_by_task(grid)["a"], methods)
    assert not statistics.ready(statistics.scores_by_task(grid)["b"], methods)


def test_a_variant_that_has_not_reached_every_task_stays_out_of_the_aggregate(tmp_path):
    """A new LM variant run on one task so far would otherwise leave the aggregate only the
    tasks it has reached; it is named instead, and joins once it has run everywhere."""
    from lmencoders import report

    methods = ["TD3+BC", "TD3+BC LM-No-Tune", "TD3+BC LM-Standardized"]
    grid = []
    for task in ("a", "b"):
        grid += rows("TD3+BC", task, [10, 20, 30]) + rows("TD3+BC LM-No-Tune", task, [15, 25, 35])
    grid += rows("TD3+BC LM-Standardized", "a", [40, 50, 60])
    overall = report._statistics(tmp_path, grid, methods)
    overall = overall[overall.index("Over the") :].split("![intervals]")[0]
    assert overall.startswith("Over the 2 tasks with normalised scores (a, b)")
    assert "Not yet run on every task, so not in this table: TD3+BC LM-Standardized." in overall
    assert "| TD3+BC LM-Standardized |" not in overall
    grid += rows("TD3+BC LM-Standardized", "b", [40])  # everywhere now, too few runs on b
    overall = report._statistics(tmp_path, grid, methods)
    overall = overall[overall.index("Over the") :].split("![intervals]")[0]
    assert overall.startswith("Over the 1 tasks with normalised scores (a)")
    assert "| TD3+BC LM-Standardized |" in overall

"""bench_mixed_tasks' report: the best static merge and the share of the static -> oracle gap each router closes,
by hand; tasks spread over a zoo of any size."""

import pytest

from benchmarks.bench_mixed_tasks import mixed_set, summary


def test_gap_closed_by_hand():
    items = [("a", "x", "y"), ("b", "x", "y")]
    scores = {"oracle": 0.8, "merge_uniform_zoo": 0.2, "merge_uniform_set": 0.4, "merge_ties_set": 0.3,
              "arrow": 0.6, "mole_mixture": 0.3}
    report = summary({"base": "tiny"}, items, scores)
    assert report["exact_match"]["best_static"] == 0.4
    assert report["gap_closed"] == pytest.approx({"arrow": 0.5, "mole_mixture": -0.25})
    assert report["tasks"] == ["a", "b"] and report["n_items"] == 2


def test_partial_scores_report_no_gap():
    """A run interrupted before the merges: no best_static, no shares (nothing divided by a missing gap)."""
    report = summary({}, [], {"zero_shot": 0.1, "oracle": 0.5})
    assert "best_static" not in report["exact_match"] and report["gap_closed"] == {}


class Zoo:
    def __init__(self, n):
        self.names = [f"t{i}" for i in range(n)]


@pytest.mark.parametrize("n,step", [(60, 5), (28, 2), (12, 1), (5, 1)])
def test_tasks_spread_over_the_zoo(n, step, monkeypatch):
    monkeypatch.setattr("benchmarks.bench_mixed_tasks.examples", lambda task, split, k, seed: [(task, "y")] * k)
    items = mixed_set(Zoo(n), 12, 2)
    assert sorted({t for t, _, _ in items}) == sorted(Zoo(n).names[::step][:12])
    assert len(items) == 2 * min(12, len(range(0, n, step)))

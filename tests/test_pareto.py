"""The Pareto front on hand-made points, ties and duplicates included."""
from __future__ import annotations

import itertools
import random

from blockdrop.pareto import Point, pareto_front, plot_front


def labels(points):
    return [p.label for p in points]


def test_front_keeps_exactly_the_non_dominated_points_cheapest_first():
    points = [Point(0.90, 5e8, "full"), Point(0.93, 3e8, "a"), Point(0.91, 2e8, "b"), Point(0.85, 1e8, "c"),
              Point(0.88, 2.5e8, "dominated by b"), Point(0.80, 1.5e8, "dominated by c")]
    assert labels(pareto_front(points)) == ["c", "b", "a"]


def test_equal_flops_keeps_only_the_most_accurate_and_equal_accuracy_only_the_cheapest():
    points = [Point(0.9, 2.0, "x"), Point(0.8, 2.0, "same flops, less accurate"),
              Point(0.9, 3.0, "same accuracy, dearer"), Point(0.95, 4.0, "y")]
    assert labels(pareto_front(points)) == ["x", "y"]


def test_exact_duplicates_are_both_on_the_front():
    points = [Point(0.9, 2.0, "first"), Point(0.9, 2.0, "second"), Point(0.7, 1.0, "cheap")]
    assert sorted(labels(pareto_front(points))) == ["cheap", "first", "second"]


def test_single_point_and_empty_input():
    assert labels(pareto_front([Point(0.5, 1.0, "only")])) == ["only"]
    assert pareto_front([]) == []


def test_front_agrees_with_the_definition_on_random_points():
    rng = random.Random(0)
    for _ in range(50):
        points = [Point(rng.choice([0.8, 0.85, 0.9, 0.95]), rng.choice([1.0, 2.0, 3.0, 4.0]), str(i))
                  for i in range(rng.randint(1, 12))]
        expected = {p.label for p in points if not any(q.dominates(p) for q in points)}
        front = pareto_front(points)
        assert {p.label for p in front} == expected
        for a, b in itertools.pairwise(front):
            assert a.flops <= b.flops and (a.flops < b.flops or a.accuracy >= b.accuracy)
            assert a.flops == b.flops or a.accuracy < b.accuracy  # dearer points on the front are better


def test_plot_is_written_as_png(tmp_path):
    points = [Point(0.9, 2.0, "g=-1"), Point(0.95, 4.0, "g=-10"), Point(0.85, 3.0)]
    path = plot_front(points, pareto_front(points), tmp_path / "front.png", reference=Point(0.96, 6.0, "full"))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000

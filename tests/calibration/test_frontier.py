"""Pareto frontier against a brute-force O(n^2) oracle, and the selection rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibserve.calibration import CalibrationError, pareto_frontier, select_point


def brute_force(points: list[tuple[float, float]]) -> list[int]:
    def dominates(p: tuple[float, float], q: tuple[float, float]) -> bool:
        return p[0] >= q[0] and p[1] <= q[1] and (p[0] > q[0] or p[1] < q[1])

    return [i for i, q in enumerate(points) if not any(dominates(p, q) for p in points)]


# Coarse grid values so that ties and exact duplicates are common.
grid = st.integers(0, 6).map(lambda k: k / 6)
point_lists = st.lists(st.tuples(grid, grid), max_size=25)


@settings(max_examples=150, deadline=None)
@given(point_lists)
def test_frontier_matches_brute_force(points: list[tuple[float, float]]) -> None:
    assert pareto_frontier(points) == brute_force(points)


def test_duplicates_of_a_frontier_point_are_all_kept() -> None:
    pts = [(0.6, 0.2), (0.6, 0.2), (0.5, 0.1), (0.6, 0.3), (0.4, 0.1)]
    assert pareto_frontier(pts) == [0, 1, 2]
    assert pareto_frontier([]) == []


@settings(max_examples=100, deadline=None)
@given(
    point_lists.filter(bool),
    st.sampled_from(["max-accuracy", "min-ece", "knee", "min-ece-at-accuracy"]),
)
def test_selected_point_is_on_the_frontier(points: list[tuple[float, float]], rule: str) -> None:
    assert select_point(points, rule) in pareto_frontier(points)


PTS = [(0.50, 0.02), (0.60, 0.03), (0.70, 0.05), (0.72, 0.15), (0.72, 0.12), (0.40, 0.02)]


def test_rules() -> None:
    assert select_point(PTS, "max-accuracy") == 4  # tie on accuracy -> lower ECE
    assert select_point(PTS, "min-ece") == 0  # tie on ECE -> higher accuracy
    assert select_point(PTS, "min-ece-at-accuracy", tolerance=0.03) == 2
    assert select_point(PTS, "min-ece-at-accuracy", tolerance=0.0) == 4
    assert select_point(PTS, "min-ece-at-accuracy", tolerance=1.0) == 0
    # Frontier 0, 1, 2, 4; normalised, point 2 bulges farthest from the extremes' line.
    assert select_point(PTS, "knee") == 2


def test_knee_degenerate_frontier() -> None:
    assert select_point([(0.5, 0.1), (0.5, 0.1), (0.4, 0.2)], "knee") == 0
    assert select_point([(0.5, 0.1), (0.7, 0.3)], "knee") == 1


def test_unknown_rule_names_valid_rules() -> None:
    with pytest.raises(ValueError, match="max-accuracy, min-ece, knee, min-ece-at-accuracy"):
        select_point(PTS, "best")
    with pytest.raises(CalibrationError):
        select_point([], "min-ece")

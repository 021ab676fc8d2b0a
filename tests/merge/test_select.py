"""Selection objectives: the rule is applied to multiple-choice, free-form or combined numbers."""

from __future__ import annotations

import numpy as np
import pytest

from calibserve.merge.evaluate import Scores
from calibserve.merge.select import available_objectives, choose, objective_pair
from calibserve.merge.sweep import Point

# lambda: (mc accuracy, mc ECE, free-form accuracy, free-form ECE)
SWEEP = {
    0.0: (0.50, 0.05, 0.30, 0.10),
    0.5: (0.60, 0.10, 0.35, 0.20),
    1.0: (0.62, 0.30, 0.50, 0.40),
}


def _points(free_form: bool = True) -> list[Point]:
    empty = Scores(np.zeros(0), np.zeros(0, bool), np.zeros(0, np.int64))
    return [
        Point(lam, {"accuracy": a, "ece": e}, empty,
              free_form_metrics={"accuracy": fa, "ece": fe} if free_form else None)
        for lam, (a, e, fa, fe) in SWEEP.items()
    ]


def test_each_objective_judges_by_its_own_numbers() -> None:
    points = _points()
    assert objective_pair(points[1], "multiple-choice") == (0.60, 0.10)
    assert objective_pair(points[1], "free-form") == (0.35, 0.20)
    assert objective_pair(points[1], "combined") == pytest.approx((0.475, 0.15))
    # min-ece-at-accuracy with a 0.05 tolerance: multiple choice keeps 0.5 and 1.0 in play
    # (0.60 >= 0.62 - 0.05) and picks 0.5; on the short answers only 1.0 is that accurate.
    mc = choose(points, "min-ece-at-accuracy", 0.05, "multiple-choice")
    ff = choose(points, "min-ece-at-accuracy", 0.05, "free-form")
    assert (mc.lam, ff.lam) == (0.5, 1.0)
    assert ff.objective == "free-form" and ff.reason.startswith("Objective: free-form")
    assert "free-form accuracy 0.500 / ECE 0.400" in ff.reason
    combined = choose(points, "min-ece", 0.01, "combined")
    assert combined.lam == 0.0 and combined.objective == "combined"
    assert "combined" in combined.reason and combined.frontier == [0, 1, 2]
    # judged against the parents on the objective's own accuracy
    assert choose(points, "max-accuracy", 0.01, "free-form").beats_both_parents_on_accuracy \
        is False


def test_points_without_short_answers_support_only_multiple_choice() -> None:
    points = _points(free_form=False)
    assert available_objectives(points) == ["multiple-choice"]
    assert available_objectives(_points()) == ["multiple-choice", "free-form", "combined"]
    assert choose(points).lam == 1.0
    with pytest.raises(ValueError, match="no short-answer metrics"):
        choose(points, "knee", 0.01, "free-form")

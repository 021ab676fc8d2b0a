"""Risk-coverage curves, AURC and threshold choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibserve.calibration import (
    CalibrationError,
    DegenerateDataError,
    aurc,
    risk_coverage,
    threshold_for_accuracy,
    threshold_for_rate,
)

CONF = [0.9, 0.8, 0.8, 0.6, 0.3]
CORRECT = [1, 1, 0, 1, 0]


def test_curve_by_hand() -> None:
    rc = risk_coverage(CONF, CORRECT)
    assert rc.thresholds.tolist() == [0.9, 0.8, 0.6, 0.3]
    np.testing.assert_allclose(rc.coverage, [0.2, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(rc.accuracy, [1.0, 2 / 3, 0.75, 0.6])
    thresholds, coverage, acc = rc  # unpacks as a tuple
    assert thresholds[0] == 0.9


def test_aurc_by_hand() -> None:
    # Risk per sample at its own threshold: 0, 1/3, 1/3, 1/4, 2/5.
    assert aurc(CONF, CORRECT) == pytest.approx((0 + 2 / 3 + 0.25 + 0.4) / 5)
    assert aurc([0.9, 0.1], [1, 0]) < aurc([0.9, 0.1], [0, 1])


def test_threshold_for_accuracy() -> None:
    assert threshold_for_accuracy(CONF, CORRECT, 0.75) == {
        "threshold": 0.6,
        "coverage": 0.8,
        "accuracy": 0.75,
    }
    assert threshold_for_accuracy(CONF, CORRECT, 0.9)["threshold"] == 0.9
    assert threshold_for_accuracy(CONF, CORRECT, 0.0)["coverage"] == 1.0
    unreachable = threshold_for_accuracy([0.9, 0.5], [0, 0], 0.5)
    assert unreachable == {"threshold": math.inf, "coverage": 0.0, "accuracy": None}
    with pytest.raises(CalibrationError):
        threshold_for_accuracy(CONF, CORRECT, 1.5)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=40), st.floats(0, 1)
)
def test_threshold_for_accuracy_is_lowest_meeting_target(
    data: list[tuple[float, bool]], target: float
) -> None:
    conf = np.array([c for c, _ in data])
    correct = np.array([y for _, y in data], dtype=float)
    res = threshold_for_accuracy(conf, correct, target)
    meets = [t for t in set(conf.tolist()) if correct[conf >= t].mean() >= target - 1e-12]
    if not meets:
        assert res["threshold"] == math.inf
        return
    assert res["threshold"] == min(meets)
    kept = conf >= min(meets)
    assert res["coverage"] == pytest.approx(kept.mean())
    assert res["accuracy"] == pytest.approx(correct[kept].mean())


def test_threshold_for_rate() -> None:
    conf = np.linspace(0.0, 1.0, 101)
    t = threshold_for_rate(conf, 0.2)
    assert np.mean(conf < t) == pytest.approx(0.2, abs=0.01)
    assert threshold_for_rate(conf, 0.0) == 0.0
    assert threshold_for_rate(conf, 1.0) == math.inf
    assert np.mean(conf < threshold_for_rate(conf, 1.0)) == 1.0
    with pytest.raises(DegenerateDataError):
        threshold_for_rate([], 0.5)
    with pytest.raises(CalibrationError):
        threshold_for_rate(conf, -0.1)

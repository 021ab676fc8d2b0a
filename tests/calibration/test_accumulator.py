"""The accumulator equals batch metrics, merges exactly and round-trips through JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibserve.calibration import CalibrationAccumulator, CalibrationError, ece

samples = st.lists(
    st.tuples(st.floats(0.0, 1.0), st.booleans()),
    max_size=60,
)


def _filled(data: list[tuple[float, bool]], n_bins: int = 15) -> CalibrationAccumulator:
    acc = CalibrationAccumulator(n_bins)
    for c, y in data:
        acc.update(c, y)
    return acc


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_accumulator_equals_batch(norm: str) -> None:
    rng = np.random.default_rng(0)
    conf = rng.random(5000)
    conf[:3] = [0.0, 1.0, 14 / 15]  # edges
    correct = rng.random(5000) < conf
    one = CalibrationAccumulator()
    for c, y in zip(conf.tolist(), correct.tolist(), strict=True):
        one.update(c, y)
    many = CalibrationAccumulator()
    many.update_many(conf, correct)
    batch = ece(conf, correct, norm=norm)
    assert abs(one.ece(norm) - batch) <= 1e-12
    assert abs(many.ece(norm) - batch) <= 1e-12
    assert one.counts.tolist() == many.counts.tolist()
    assert one.count == 5000


@settings(max_examples=60, deadline=None)
@given(samples, samples)
def test_merge_equals_union(a: list[tuple[float, bool]], b: list[tuple[float, bool]]) -> None:
    merged = _filled(a).merge(_filled(b))
    union = _filled(a + b)
    assert merged.counts.tolist() == union.counts.tolist()
    np.testing.assert_allclose(merged.conf_sum, union.conf_sum, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.correct_sum, union.correct_sum, rtol=1e-12, atol=1e-12)
    assert merged.ece() == pytest.approx(union.ece(), abs=1e-12)
    if a or b:
        conf = [c for c, _ in a + b]
        correct = [y for _, y in a + b]
        assert merged.ece() == pytest.approx(ece(conf, correct), abs=1e-12)


def test_add_does_not_mutate() -> None:
    a = _filled([(0.9, True)])
    b = _filled([(0.1, False)])
    c = a + b
    assert (a.count, b.count, c.count) == (1, 1, 2)


def test_merge_checks_bins() -> None:
    with pytest.raises(CalibrationError, match="different bins"):
        CalibrationAccumulator(10).merge(CalibrationAccumulator(15))


def test_json_round_trip() -> None:
    acc = _filled([(0.3, True), (0.95, False), (1.0, True)], n_bins=10)
    text = json.dumps(acc.to_dict())
    back = CalibrationAccumulator.from_dict(json.loads(text))
    assert back == acc
    assert back.ece() == acc.ece()
    with pytest.raises(CalibrationError):
        CalibrationAccumulator.from_dict({"n_bins": 2, "counts": [1], "conf_sum": [0.1]})


def test_empty_and_invalid_updates() -> None:
    acc = CalibrationAccumulator()
    assert acc.ece() == 0.0 and acc.count == 0
    assert np.isnan(acc.accuracy())
    with pytest.raises(CalibrationError):
        acc.update(float("nan"), True)
    with pytest.raises(CalibrationError):
        acc.update(0.5, 3)
    acc.update(1.5, True)  # clipped: goes to the last bin
    assert acc.counts[-1] == 1 and acc.conf_sum[-1] == 1.0

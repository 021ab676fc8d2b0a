"""Calibrators: sklearn isotonic oracle, monotonicity, NLL never rises, JSON round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.isotonic import IsotonicRegression

from calibserve.calibration import (
    CalibrationError,
    DegenerateDataError,
    HistogramBinning,
    IdentityCalibrator,
    IsotonicCalibrator,
    PlattScaling,
    TemperatureScaling,
    calibrator_from_dict,
    ece,
    nll,
)
from calibserve.calibration.calibrators import Calibrator, pool_adjacent_violators

FITTABLE = [TemperatureScaling, PlattScaling, IsotonicCalibrator, HistogramBinning]


def _overconfident(seed: int, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    # Confidence sigmoid(z) while the truth is sigmoid(z / 2.5): an over-confident model.
    rng = np.random.default_rng(seed)
    z = rng.normal(1.0, 2.5, n)
    conf = 1.0 / (1.0 + np.exp(-z))
    correct = rng.random(n) < 1.0 / (1.0 + np.exp(-z / 2.5))
    return conf, correct


labelled = st.lists(st.tuples(st.floats(0.0, 1.0), st.booleans()), min_size=2, max_size=40).filter(
    lambda xs: len({y for _, y in xs}) == 2
)


@pytest.mark.parametrize("seed", [0, 1])
def test_isotonic_matches_sklearn(seed: int) -> None:
    conf, correct = _overconfident(seed, 500)
    conf = np.round(conf, 2)  # force ties
    # Without the prior's pseudo-observations the fit is plain isotonic regression.
    ours = IsotonicCalibrator(prior_strength=0.0).fit(conf, correct)
    oracle = IsotonicRegression(out_of_bounds="clip").fit(conf, correct.astype(float))
    grid = np.linspace(0, 1, 1001)
    np.testing.assert_allclose(ours.apply(grid), oracle.predict(grid), atol=1e-12)
    np.testing.assert_allclose(ours.apply(conf), oracle.predict(conf), atol=1e-12)


def test_pav_by_hand() -> None:
    assert pool_adjacent_violators([1, 3, 2, 4]).tolist() == [1, 2.5, 2.5, 4]
    assert pool_adjacent_violators([3, 2, 1], [1, 1, 2]).tolist() == pytest.approx([1.75] * 3)


@settings(max_examples=40, deadline=None)
@given(labelled, st.sampled_from(FITTABLE))
def test_calibrators_are_monotone(data: list[tuple[float, bool]], cls: type[Calibrator]) -> None:
    conf = [c for c, _ in data]
    correct = [y for _, y in data]
    cal = cls().fit(conf, correct)
    grid = np.linspace(0.0, 1.0, 201)
    out = cal.apply(grid)
    assert np.all(np.diff(out) >= -1e-12)
    assert np.all((out >= 0.0) & (out <= 1.0))


@settings(max_examples=40, deadline=None)
@given(labelled)
def test_temperature_never_raises_nll(data: list[tuple[float, bool]]) -> None:
    conf = np.array([c for c, _ in data])
    correct = np.array([y for _, y in data])
    cal = TemperatureScaling().fit(conf, correct)
    assert nll(cal.apply(conf), correct) <= nll(conf, correct) + 1e-9


@pytest.mark.parametrize("cls", FITTABLE)
def test_fitting_reduces_ece_on_overconfident_data(cls: type[Calibrator]) -> None:
    conf, correct = _overconfident(0)
    test_conf, test_correct = _overconfident(1)
    cal = cls().fit(conf, correct)
    assert ece(cal.apply(test_conf), test_correct) < 0.5 * ece(test_conf, test_correct)


def test_temperature_softens_overconfidence() -> None:
    conf, correct = _overconfident(2)
    assert TemperatureScaling().fit(conf, correct).temperature == pytest.approx(2.5, rel=0.15)


def test_fit_logits_recovers_temperature() -> None:
    rng = np.random.default_rng(0)
    true_t = 2.5
    logits = rng.normal(0, 3, size=(4000, 4))
    p = np.exp(logits / true_t)
    p /= p.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=row) for row in p])
    cal = TemperatureScaling().fit_logits(logits, labels)
    assert cal.temperature == pytest.approx(true_t, rel=0.1)
    # Option logprobs (logits shifted per row) give the same T.
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert TemperatureScaling().fit_logits(logprobs, labels).temperature == pytest.approx(
        cal.temperature, rel=1e-4
    )
    # What is applied is the scalar binary form.
    assert cal.apply(0.5) == pytest.approx(0.5)
    assert cal.apply(0.9) < 0.9


def test_fit_logits_rejects_bad_input() -> None:
    with pytest.raises(DegenerateDataError):
        TemperatureScaling().fit_logits(np.zeros((3, 4)), [0, 1])
    with pytest.raises(DegenerateDataError):
        TemperatureScaling().fit_logits(np.zeros((2, 4)), [0, 4])
    with pytest.raises(DegenerateDataError):
        TemperatureScaling().fit_logits(np.zeros((0, 4)), [])


@pytest.mark.parametrize("cls", FITTABLE)
@pytest.mark.parametrize(
    ("conf", "correct", "match"),
    [
        ([], [], "no samples"),
        ([0.2, float("nan")], [0, 1], "NaN"),
        ([0.2, 0.3], [1, 1], "labels are equal"),
        ([0.2, 0.3], [0, 0], "labels are equal"),
        ([0.2, 0.3, 0.4], [0, 1], "length"),
    ],
)
def test_degenerate_input(
    cls: type[Calibrator], conf: list[float], correct: list[int], match: str
) -> None:
    with pytest.raises(DegenerateDataError, match=match):
        cls().fit(conf, correct)


@pytest.mark.parametrize("cls", [*FITTABLE, IdentityCalibrator])
def test_json_round_trip(cls: type[Calibrator]) -> None:
    conf, correct = _overconfident(3, 300)
    cal = cls().fit(conf, correct)
    d = json.loads(json.dumps(cal.to_dict()))
    assert d["type"] == cls.type_name
    back = calibrator_from_dict(d)
    assert type(back) is cls
    grid = np.linspace(0, 1, 101)
    np.testing.assert_array_equal(back.apply(grid), cal.apply(grid))


def test_apply_shapes_and_edges() -> None:
    cal = TemperatureScaling(2.0)
    assert isinstance(cal.apply(0.7), float)
    assert cal.apply(np.array([[0.2, 0.8]])).shape == (1, 2)
    assert 0.0 <= cal.apply(0.0) < 1e-5 and 1 - 1e-5 < cal.apply(1.0) <= 1.0
    assert IdentityCalibrator().apply(1.3) == 1.0


def test_constructor_and_dict_validation() -> None:
    with pytest.raises(CalibrationError, match="unknown calibrator type"):
        calibrator_from_dict({"type": "magic"})
    with pytest.raises(CalibrationError):
        calibrator_from_dict({"type": "temperature", "temperature": -1})
    with pytest.raises(CalibrationError):
        calibrator_from_dict({"type": "temperature", "scale": 2})
    with pytest.raises(CalibrationError):
        IsotonicCalibrator([0.0, 1.0], [0.8, 0.2])


def test_platt_anticorrelated_is_constant() -> None:
    conf = np.array([0.1, 0.2, 0.8, 0.9] * 10)
    correct = np.array([1, 1, 0, 0] * 10)
    out = PlattScaling().fit(conf, correct).apply(np.linspace(0, 1, 11))
    assert np.ptp(out) == pytest.approx(0.0, abs=1e-12)


def test_histogram_never_serves_0_or_1_for_a_bin_it_did_not_see() -> None:
    # Issue 27's case: the lowest confidences seen were few and all wrong, most bins empty. The
    # old fit served 0.0 from the first seen bin downwards; a raw 0.6 was told it was surely wrong.
    conf = np.array([0.05, 0.06, 0.55, 0.56, 0.57, 0.58, 0.95, 0.96, 0.97, 0.98])
    right = np.array([0, 0, 1, 0, 1, 1, 1, 1, 1, 1])
    h = HistogramBinning(10).fit(conf, right)
    assert np.all(h.values > 0.0) and np.all(h.values < 1.0)
    assert np.all(np.diff(h.values) >= 0)
    unseen = [0.25, 0.35, 0.45, 0.65, 0.75]
    # Unseen bins sit between their seen neighbours, and well away from 0 and 1.
    assert np.all((h.apply(unseen) > 0.1) & (h.apply(unseen) < 0.95))
    # A big bin is hardly moved by the prior.
    many = HistogramBinning(10).fit(np.r_[np.full(1000, 0.85), 0.15, 0.16],
                                    np.r_[np.ones(700), np.zeros(300), 0, 1])
    assert float(many.apply(0.85)) == pytest.approx(700 / 1000, abs=0.002)
    with pytest.raises(CalibrationError):
        HistogramBinning(10, prior_strength=0.0)


def test_isotonic_blocks_are_shrunk_towards_the_base_rate_and_stay_monotone() -> None:
    rng = np.random.default_rng(3)
    conf = np.r_[0.02, rng.uniform(0.3, 1.0, 400)]
    right = np.r_[0, rng.random(400) < conf[1:]]
    iso = IsotonicCalibrator().fit(conf, right)
    grid = np.linspace(0, 1, 201)
    served = iso.apply(grid)
    assert np.all(np.diff(served) >= -1e-12)
    # The lone wrong answer at 0.02 is a block of one: served far from 0.
    assert float(iso.apply(0.0)) > 0.1
    assert float(served.max()) < 1.0

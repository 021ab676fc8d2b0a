"""Binned metrics against torchmetrics and scikit-learn oracles, plus edge cases."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.functional.classification import binary_calibration_error

from calibserve.calibration import (
    CalibrationError,
    DegenerateDataError,
    accuracy,
    bin_index,
    brier,
    ece,
    equal_mass_ece,
    mce,
    mean_confidence,
    nll,
    reliability_diagram,
    rms_ce,
)


def _data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    conf = rng.random(n)
    correct = rng.random(n) < conf**1.7  # over-confident on purpose
    return conf, correct


@pytest.mark.parametrize("norm", ["l1", "max", "l2"])
@pytest.mark.parametrize("n_bins", [1, 10, 15])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_torchmetrics(norm: Literal["l1", "l2", "max"], n_bins: int, seed: int) -> None:
    conf, correct = _data(seed, 2000)
    expected = binary_calibration_error(
        torch.tensor(conf), torch.tensor(correct.astype(np.int64)), n_bins=n_bins, norm=norm
    ).item()
    assert ece(conf, correct, n_bins=n_bins, norm=norm) == pytest.approx(expected, abs=1e-9)


def test_wrappers_are_the_norms() -> None:
    conf, correct = _data(3, 500)
    assert mce(conf, correct) == ece(conf, correct, norm="max")
    assert rms_ce(conf, correct) == ece(conf, correct, norm="l2")
    assert mce(conf, correct) >= rms_ce(conf, correct) >= ece(conf, correct) > 0


def test_unknown_norm_is_rejected() -> None:
    with pytest.raises(CalibrationError, match="l1, l2, max"):
        ece([0.5], [1], norm="l3")


def test_bin_edges_left_closed_and_one_in_last_bin() -> None:
    n = 10
    edges = [0.0, 0.1, 0.5, 0.9, 0.95, 1.0]
    assert bin_index(edges, n).tolist() == [0, 1, 5, 9, 9, 9]
    assert bin_index([np.nextafter(0.5, 0)], n).tolist() == [4]
    # Out-of-range inputs are clipped, not rejected.
    assert bin_index([-0.5, 1.5], n).tolist() == [0, 9]


def test_confidence_exactly_zero_and_one() -> None:
    assert ece([1.0, 1.0], [1, 1]) == 0.0
    assert ece([0.0, 0.0], [0, 0]) == 0.0
    assert ece([1.0, 0.0], [0, 1]) == 1.0
    assert brier([1.0, 0.0], [1, 0]) == 0.0
    assert np.isfinite(nll([1.0, 0.0], [0, 1]))


def test_perfectly_calibrated_bin_has_no_error() -> None:
    conf = np.full(10, 0.7)
    correct = np.array([1] * 7 + [0] * 3)
    assert ece(conf, correct) == pytest.approx(0.0, abs=1e-15)
    assert mce(conf, correct) == pytest.approx(0.0, abs=1e-15)


def test_brier_and_nll_match_sklearn() -> None:
    conf, correct = _data(4, 1000)
    assert brier(conf, correct) == pytest.approx(brier_score_loss(correct, conf), rel=1e-12)
    assert nll(conf, correct) == pytest.approx(log_loss(correct, conf), rel=1e-9)


def test_accuracy_and_mean_confidence() -> None:
    assert accuracy([True, False, True, True]) == 0.75
    assert mean_confidence([0.2, 0.4]) == pytest.approx(0.3)


def test_equal_mass_ece_by_hand() -> None:
    conf = np.array([0.1, 0.2, 0.8, 0.9])
    correct = np.array([0, 1, 1, 1])
    # Two bins of two: |0.3 - 1| / 4 + |1.7 - 2| / 4
    assert equal_mass_ece(conf, correct, n_bins=2) == pytest.approx((0.7 + 0.3) / 4)
    # More bins than samples: one sample per bin.
    assert equal_mass_ece(conf, correct, n_bins=15) == pytest.approx((0.1 + 0.8 + 0.2 + 0.1) / 4)


def test_empty_input() -> None:
    assert ece([], []) == 0.0
    assert mce([], []) == 0.0
    assert equal_mass_ece([], []) == 0.0
    for fn in (brier, nll):
        with pytest.raises(DegenerateDataError):
            fn([], [])
    with pytest.raises(DegenerateDataError):
        accuracy([])
    with pytest.raises(DegenerateDataError):
        mean_confidence([])


def test_bad_input_is_rejected() -> None:
    with pytest.raises(DegenerateDataError, match="NaN"):
        ece([0.5, float("nan")], [1, 0])
    with pytest.raises(DegenerateDataError, match="length"):
        ece([0.5, 0.6], [1])
    with pytest.raises(DegenerateDataError):
        ece([0.5], [2])
    with pytest.raises(DegenerateDataError):
        ece([0.5], [1], n_bins=0)
    assert issubclass(DegenerateDataError, ValueError)


def test_reliability_diagram() -> None:
    d = reliability_diagram([0.05, 0.15, 0.15, 1.0], [0, 1, 0, 1], n_bins=10)
    assert d["bin_edges"][0] == 0.0 and d["bin_edges"][-1] == 1.0 and len(d["bin_edges"]) == 11
    assert d["counts"] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
    assert d["accuracy"][1] == 0.5 and d["accuracy"][2] is None
    assert d["mean_confidence"][9] == 1.0

"""calibration.online: refit on the older samples, validate on the newest, by a margin."""

from __future__ import annotations

import numpy as np
import pytest

from calibserve.calibration import CalibrationError, TemperatureScaling, ece
from calibserve.calibration.online import escalation_rate, refit, thresholds_for


def overconfident(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw confidence in [0.5, 1), right with probability 0.5 + 0.3 (raw - 0.5)."""
    rng = np.random.default_rng(seed)
    raw = rng.uniform(0.5, 1.0, n)
    return raw, (rng.uniform(size=n) < 0.5 + 0.3 * (raw - 0.5)).astype(float)


def test_a_drifted_window_gets_a_better_map() -> None:
    raw, correct = overconfident(1000, seed=1)
    result = refit(raw, correct, TemperatureScaling(1.0))
    assert result.n_fit == 700 and result.n_validate == 300
    assert result.better and result.candidate_ece < result.current_ece - 0.02
    assert result.brier_gain_z >= result.z
    # The ECEs are those of the newest 300 samples under each map.
    held = raw[700:]
    assert result.current_ece == pytest.approx(ece(held, correct[700:]))
    assert result.candidate_ece == pytest.approx(
        ece(np.clip(result.candidate.apply(held), 0, 1), correct[700:]))


def test_calibrated_windows_are_kept_and_drifted_ones_refitted() -> None:
    """The decision's error rates (docs: recalibration.py): noise swaps are rare, drift is seen."""
    kept = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        raw = rng.uniform(0.3, 1.0, 800)
        correct = (rng.uniform(size=800) < raw).astype(float)  # calibrated as served
        kept += not refit(raw, correct, TemperatureScaling(1.0)).better
    assert kept >= 98
    swapped = sum(refit(*overconfident(1000, seed), TemperatureScaling(1.0)).better
                  for seed in range(40))
    assert swapped >= 30


def test_bad_input() -> None:
    with pytest.raises(CalibrationError):
        refit([0.5, 0.6], [1.0], TemperatureScaling(1.0))
    with pytest.raises(CalibrationError, match="too few"):
        refit([0.5, 0.6], [1.0, 0.0], TemperatureScaling(1.0))
    with pytest.raises(CalibrationError, match="validate_fraction"):
        refit([0.5] * 10, [1.0] * 10, TemperatureScaling(1.0), validate_fraction=1.0)


def test_thresholds_and_escalation_rate() -> None:
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([1.0, 1.0, 0.0, 0.0])
    [t] = thresholds_for(conf, correct, [1.0])
    assert t["threshold"] == 0.8 and t["coverage"] == 0.5 and t["accuracy"] == 1.0
    assert escalation_rate(conf, 0.8) == 0.5 and escalation_rate(conf, None) == 0.0

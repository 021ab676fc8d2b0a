"""Escalation policies: threshold, auto threshold from calibration.json, running-quantile budget."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from calibserve.calibration import CalibrationDocument, CalibrationError
from calibserve.routing import BudgetPolicy, NeverPolicy, ThresholdPolicy


def test_threshold_escalates_strictly_below() -> None:
    p = ThresholdPolicy(0.6)
    assert p.decide(0.59).escalate and p.decide(0.59).reason == "low_confidence"
    assert not p.decide(0.6).escalate
    assert p.decide(0.9).threshold == 0.6
    assert p.decide(float("nan")).escalate  # unknown confidence is treated as none


def test_threshold_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        ThresholdPolicy(1.5)


def test_auto_threshold_from_calibration_json(tmp_path) -> None:
    cfg = {"thresholds": [{"target_accuracy": 0.8, "threshold": 0.63, "coverage": 0.5},
                          {"target_accuracy": 0.9, "threshold": 0.8, "coverage": 0.3}]}
    assert ThresholdPolicy.auto(cfg, 0.8).threshold == 0.63
    assert ThresholdPolicy.auto(cfg, 0.85).threshold == 0.8  # conservative: next higher target
    assert ThresholdPolicy.auto(cfg).threshold == 0.8
    with pytest.raises(ValueError, match="0.95"):
        ThresholdPolicy.auto(cfg, 0.95)
    (tmp_path / "calibration.json").write_text(__import__("json").dumps(cfg))
    assert ThresholdPolicy.auto(tmp_path, 0.8).threshold == 0.63  # model dir or file path
    with pytest.raises(ValueError, match="no thresholds"):
        ThresholdPolicy.auto({"thresholds": []})


def test_auto_threshold_is_per_method(tmp_path) -> None:
    def thresholds(*pairs: tuple[float, float]) -> list[dict[str, float]]:
        return [{"target_accuracy": t, "threshold": v, "coverage": 0.5} for t, v in pairs]

    doc = CalibrationDocument.from_dict({
        "version": 2,
        "methods": {
            "answer": {"calibrator": {"type": "temperature", "temperature": 1.5},
                       "thresholds": thresholds((0.8, 0.6), (0.9, 0.75))},
            "mean": {"calibrator": {"type": "temperature", "temperature": 2.0},
                     "thresholds": thresholds((0.8, 0.4))},
            "min": {},
        },
        "multiple_choice": "answer", "free_form": "mean",
    })
    assert ThresholdPolicy.auto(doc, 0.8).threshold == 0.6  # the multiple-choice method's
    assert ThresholdPolicy.auto(doc, 0.8, method="mean").threshold == 0.4
    assert ThresholdPolicy.auto(doc).threshold == 0.75
    with pytest.raises(ValueError, match="'min'"):
        ThresholdPolicy.auto(doc, 0.8, method="min")  # no thresholds of its own
    with pytest.raises(CalibrationError, match="no method 'first'"):
        ThresholdPolicy.auto(doc, 0.8, method="first")
    doc.write(tmp_path)  # the typed document, a path or a parsed dict: one loader
    assert ThresholdPolicy.auto(tmp_path / "calibration.json", 0.8, "mean").threshold == 0.4
    assert ThresholdPolicy.auto(doc.to_dict(), 0.9).threshold == 0.75
    (tmp_path / "calibration.json").write_text('{"version": 9}')
    with pytest.raises(CalibrationError, match="version 9"):
        ThresholdPolicy.auto(tmp_path, 0.8)


def test_never() -> None:
    assert not NeverPolicy().decide(0.0).escalate


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
def test_budget_tracks_target_rate_on_stationary_stream(rate: float) -> None:
    rng = random.Random(1)
    p = BudgetPolicy(rate, window=500)
    decisions = [p.decide(rng.betavariate(5, 2)).escalate for _ in range(5000)]
    observed = sum(decisions[500:]) / len(decisions[500:])
    assert abs(observed - rate) < 0.03, observed


def test_budget_follows_a_drifting_distribution() -> None:
    # Confidences shift upward halfway; a fixed threshold would stop escalating, the budget not.
    rng = random.Random(2)
    p = BudgetPolicy(0.2, window=300)
    for _ in range(1000):
        p.decide(rng.uniform(0.2, 0.6))
    late = [p.decide(rng.uniform(0.7, 1.0)).escalate for _ in range(2000)]
    assert abs(sum(late[500:]) / 1500 - 0.2) < 0.04
    assert p.threshold is not None and p.threshold > 0.7


def test_budget_warmup_uses_initial_threshold() -> None:
    p = BudgetPolicy(0.5, window=100, min_samples=10, initial_threshold=0.3)
    assert p.decide(0.2).escalate and not p.decide(0.4).escalate
    q = BudgetPolicy(0.5, window=100, min_samples=10)
    assert not q.decide(0.0).escalate  # no threshold yet: no escalation while warming up


@given(st.lists(st.floats(0, 1), min_size=1, max_size=200), st.integers(1, 50))
def test_budget_window_is_the_last_values_sorted(values: list[float], window: int) -> None:
    p = BudgetPolicy(0.3, window=window, min_samples=1)
    for v in values:
        p.decide(v)
    assert p._sorted == sorted(values[-window:])


def _two_method_doc() -> dict[str, object]:
    th = [{"target_accuracy": 0.8, "threshold": 0.6, "coverage": 0.5}]
    return {"version": 2, "multiple_choice": "answer", "free_form": "verify",
            "methods": {"answer": {"thresholds": th,
                                   "calibrator": {"type": "temperature", "temperature": 2.0}},
                        "verify": {"calibrator": {"type": "platt", "a": 1.0, "b": 0.0},
                                   "thresholds": [{"target_accuracy": 0.8, "threshold": 0.4,
                                                   "coverage": 0.5}]},
                        "mean": {}}}


def test_auto_holds_one_threshold_per_method() -> None:
    from calibserve.routing import ThresholdPolicy

    p = ThresholdPolicy.auto(_two_method_doc(), 0.8)
    assert p.methods == {"answer": 0.6, "verify": 0.4} and p.threshold == 0.6
    assert p.decide(0.5, "answer", True).escalate          # answer's own 0.6
    assert not p.decide(0.5, "verify", True).escalate      # verify's own 0.4
    assert p.decide(0.5, "verify", True).threshold == 0.4
    # uncalibrated `mean` (verify's fallback): judged by the free-form method's threshold
    assert p.decide(0.3, "mean", False).threshold == 0.4
    assert p.decide(0.3, "mean", False).escalate


def test_the_uncalibrated_setting() -> None:
    from calibserve.routing import ThresholdPolicy

    doc = _two_method_doc()
    esc = ThresholdPolicy.auto(doc, uncalibrated="escalate").decide(0.99, "mean", False)
    assert esc.escalate and esc.reason == "uncalibrated"
    assert not ThresholdPolicy.auto(doc, uncalibrated="serve").decide(0.0, "mean", False).escalate
    # no threshold for the free-form method: an uncalibrated reply is served
    del doc["methods"]["verify"]["thresholds"]  # type: ignore[index]
    served = ThresholdPolicy.auto(doc).decide(0.0, "mean", False)
    assert not served.escalate and served.threshold is None
    # an explicit threshold applies to every method, calibrated or not
    assert ThresholdPolicy(0.5).decide(0.4, "mean", False).escalate
    with pytest.raises(ValueError, match="uncalibrated must be one of"):
        ThresholdPolicy(0.5, uncalibrated="sometimes")

"""server/drift.py: the fit-time reference the drift rules compare live calibration against."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from calibserve.calibration import CalibrationDocument, CalibrationError
from calibserve.calibration.online import confidence_quantiles
from calibserve.server.drift import FitReference, reference_cdf
from calibserve.server.metrics import CONFIDENCE_BUCKETS
from calibserve.testing.checks import sample


def test_reference_cdf_inverts_the_quantiles() -> None:
    rng = np.random.default_rng(0)
    values = rng.beta(5, 2, size=5000)
    q = confidence_quantiles(values)
    assert len(q) == 101 and q == sorted(q)
    edges = [*CONFIDENCE_BUCKETS, float("inf")]
    cdf = reference_cdf(q, edges)
    empirical = [float(np.mean(values <= e)) for e in edges]
    assert np.max(np.abs(np.subtract(cdf, empirical))) < 0.01
    assert cdf[-1] == 1.0 and cdf == sorted(cdf)
    # A point mass: 0 below it, 1 from it on.
    assert reference_cdf([0.75] * 101, [0.7, 0.75, 0.8]) == [0.0, 1.0, 1.0]


def doc(**fit: object) -> CalibrationDocument:
    return CalibrationDocument.from_dict({
        "version": 2, "multiple_choice": "answer", "free_form": "mean",
        "metrics": {"test": {"ece": 0.13, "n": 320}},
        "methods": {
            "answer": {"calibrator": {"type": "temperature", "temperature": 2.0},
                       "fit": {"n": 320, "ece_raw": 0.2, "ece_calibrated": 0.04, **fit}},
            "mean": {},
        },
    })


def test_fit_gauges() -> None:
    registry = CollectorRegistry()
    FitReference(registry).publish("m", doc(confidence_quantiles=list(np.linspace(0.5, 1, 101))))
    text = generate_latest(registry).decode()
    assert sample(text, "calibserve_calibration_fit_ece", model="m", method="answer",
                  split="fit") == 0.04
    assert sample(text, "calibserve_calibration_fit_ece", model="m", method="answer",
                  split="held_out") == 0.13
    assert sample(text, "calibserve_calibration_fit_samples", model="m", method="answer") == 320
    assert sample(text, "calibserve_calibration_fit_confidence_cdf", model="m", method="answer",
                  le="0.5") == 0.0
    assert sample(text, "calibserve_calibration_fit_confidence_cdf", model="m", method="answer",
                  le="0.8") == pytest.approx(0.6)
    assert sample(text, "calibserve_calibration_fit_confidence_cdf", model="m", method="answer",
                  le="+Inf") == 1.0
    # The uncalibrated `mean` has no fit: nothing to compare it with.
    assert 'method="mean"' not in text


def test_documents_without_quantiles_publish_no_reference() -> None:
    registry = CollectorRegistry()
    FitReference(registry).publish("m", doc())
    text = generate_latest(registry).decode()
    assert "calibserve_calibration_fit_ece{" in text
    assert "calibserve_calibration_fit_confidence_cdf{" not in text
    FitReference(CollectorRegistry()).publish("m", None)  # no calibration.json: nothing


def test_the_document_checks_its_quantiles() -> None:
    for bad in ([0.5], [0.9, 0.5], [0.5, 1.5]):
        with pytest.raises(CalibrationError, match="confidence_quantiles"):
            doc(confidence_quantiles=bad)
    assert doc(confidence_quantiles=[0.1, 0.9]).to_dict()["methods"]["answer"]["fit"][
        "confidence_quantiles"] == [0.1, 0.9]

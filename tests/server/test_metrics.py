"""Metric names and the feedback -> per-bin counters -> ECE path (no upstream needed)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import calibserve.calibration as calibration
from calibserve.server.feedback import FeedbackRecorder
from calibserve.server.ids import ResponseIdSigner
from calibserve.server.metrics import ServerMetrics
from calibserve.server.openai_schema import FeedbackRequest
from calibserve.testing.checks import sample, total

NAMES = [
    "calibserve_requests_total", "calibserve_request_duration_seconds_bucket",
    "calibserve_proxy_overhead_seconds_bucket", "calibserve_confidence_bucket",
    "calibserve_calibration_samples_total", "calibserve_calibration_confidence_sum",
    "calibserve_calibration_correct_total", "calibserve_ece", "calibserve_feedback_total",
    "calibserve_upstream_errors_total", "calibserve_engine_restarts_total",
    "calibserve_engine_up",
]


def exercised_metrics() -> ServerMetrics:
    m = ServerMetrics()
    m.init_model("m")
    m.requests.labels("m", "chat", "ok").inc()
    m.duration.labels("m", "chat").observe(0.1)
    m.overhead.labels("m", "chat").observe(0.001)
    m.confidence.labels("m", "answer").observe(0.5)
    m.feedback.labels("m", "forged").inc()
    m.upstream_errors.labels("u", "connect").inc()
    m.engine_restarts.labels("m").inc()
    m.engine_up.labels("m").set(1)
    return m


def test_exposition_has_exact_names() -> None:
    text = exercised_metrics().render().decode()
    for name in NAMES:
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    # prometheus_client would have exported this one as ..._sum_total: it must not.
    assert "calibserve_calibration_confidence_sum_total" not in text
    assert "# TYPE calibserve_calibration_confidence_sum counter" in text
    # 15 bins per model, labelled "0".."14", present from the start.
    for b in range(15):
        assert sample(text, "calibserve_calibration_samples_total", model="m", bin=str(b)) == 0


def test_feedback_moves_bins_and_ece_exactly() -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 200)
    conf[:3] = [0.0, 1.0, 14 / 15]  # edges: first bin, 1.0 in the last bin, a boundary
    correct = rng.uniform(0, 1, 200) < conf
    metrics = ServerMetrics()
    signer = ResponseIdSigner("k")
    recorder = FeedbackRecorder(signer, metrics, {"m"}, ttl_s=3600, memory=1000)
    metrics.init_model("m")
    for c, y in zip(conf, correct, strict=True):
        rid = signer.issue("chatcmpl-", "m", [float(c)], [float(c)])
        recorder.record(FeedbackRequest(id=rid, correct=bool(y)))
    text = metrics.render().decode()
    bins = calibration.bin_index(conf, n_bins=calibration.N_BINS)
    for b in range(15):
        in_bin = bins == b
        assert sample(text, "calibserve_calibration_samples_total", model="m", bin=str(b)) == \
            in_bin.sum()
        assert sample(text, "calibserve_calibration_correct_total", model="m", bin=str(b)) == \
            correct[in_bin].sum()
        assert sample(text, "calibserve_calibration_confidence_sum", model="m", bin=str(b)) == \
            pytest.approx(conf[in_bin].sum(), rel=1e-12, abs=1e-12)
    expected = calibration.ece(conf, correct)
    assert sample(text, "calibserve_ece", model="m") == pytest.approx(expected, rel=1e-12)
    assert sample(text, "calibserve_feedback_total", model="m", outcome="accepted") == 200


def test_rejected_feedback_never_moves_counters() -> None:
    from calibserve.server.errors import APIError

    metrics = ServerMetrics()
    signer = ResponseIdSigner("k")
    recorder = FeedbackRecorder(signer, metrics, {"m"}, ttl_s=3600, memory=1000)
    good = signer.issue("chatcmpl-", "m", [0.7], [0.7])
    recorder.record(FeedbackRequest(id=good, correct=True))
    cases = [
        (good, 409, "duplicate"),
        (ResponseIdSigner("other").issue("chatcmpl-", "m", [0.7], [0.7]), 404, "forged"),
        (signer.issue("chatcmpl-", "not-served", [0.7], [0.7]), 404, "unknown"),
        ("chatcmpl-garbage", 400, "malformed"),
        (good[:-5], 400, "malformed"),
        (signer.issue("cmpl-", "m", [0.7], [0.7], now=1.0), 404, "unknown"),  # expired
    ]
    for rid, status, _ in cases:
        with pytest.raises(APIError) as info:
            recorder.record(FeedbackRequest(id=rid, correct=False))
        assert info.value.status == status, rid
    acc = metrics.accumulator("m")
    assert acc.count == 1 and float(acc.correct_sum.sum()) == 1.0
    text = metrics.render().decode()
    assert total(text, "calibserve_feedback_total", outcome="duplicate") == 1
    assert total(text, "calibserve_feedback_total", outcome="forged") == 1
    assert total(text, "calibserve_feedback_total", outcome="unknown") == 2
    assert total(text, "calibserve_feedback_total", outcome="malformed") == 2


def test_score_alternative_and_choice_index() -> None:
    metrics = ServerMetrics()
    signer = ResponseIdSigner("k")
    recorder = FeedbackRecorder(signer, metrics, {"m"}, ttl_s=3600, memory=1000)
    rid = signer.issue("chatcmpl-", "m", [0.2, 0.95], [0.2, 0.95])
    out = recorder.record(FeedbackRequest(id=rid, score=1, choice=1))
    assert out.confidence == 0.95 and out.correct and out.bin == 14
    recorder.record(FeedbackRequest(id=rid, correct=False))  # choice 0: its own feedback
    assert metrics.accumulator("m").count == 2


def test_one_registry_holds_server_routing_and_process_series() -> None:
    from fastapi.testclient import TestClient
    from prometheus_client import REGISTRY

    from calibserve.server.app import create_app
    from calibserve.server.config import ServerSettings

    def scrape(name: str) -> str:
        settings = ServerSettings.model_validate({
            "models": [{"name": name, "upstreams": ["http://127.0.0.1:9/v1"],
                        "upstream_model": name}],
            "signing_key": "test-only",
        })
        return TestClient(create_app(settings)).get("/metrics").text  # no lifespan

    text, other = scrape("one-registry-a"), scrape("one-registry-b")
    for family in ("calibserve_requests", "calibserve_route_requests",
                   "calibserve_escalations", "calibserve_circuit_opens"):
        assert len(re.findall(rf"^# TYPE {family}(_total)? counter$", text, re.M)) == 1, family
    assert sample(text, "calibserve_circuit_state", upstream="one-registry-a") == 0
    assert "process_cpu_seconds_total" in text and "python_info" in text
    # Each app renders its own routing series, and none of them lands on the default registry.
    assert 'upstream="one-registry-a"' not in other
    assert REGISTRY.get_sample_value("calibserve_circuit_state",
                                     {"upstream": "one-registry-a"}) is None


def test_feedback_is_counted_under_the_method_the_id_carries() -> None:
    """Option-letter and free-form feedback never share bins; an id issued before ids carried
    the method is still accepted and counted under the model's multiple-choice method."""
    metrics = ServerMetrics()
    signer = ResponseIdSigner("k")
    recorder = FeedbackRecorder(signer, metrics, {"m"}, ttl_s=3600, memory=1000,
                                multiple_choice={"m": "answer"})
    metrics.init_model("m", ("answer", "verify"))
    both = signer.issue("chatcmpl-", "m", [0.9, 0.2], [0.9, 0.2], methods=["answer", "verify"])
    old = signer.issue("chatcmpl-", "m", [0.5], [0.5])  # no methods in it
    assert signer.verify(old).methods is None
    assert recorder.record(FeedbackRequest(id=both, correct=True, choice=1)).method == "verify"
    assert recorder.record(FeedbackRequest(id=both, correct=True, choice=0)).method == "answer"
    assert recorder.record(FeedbackRequest(id=old, correct=False)).method == "answer"
    text = metrics.render().decode()
    assert sample(text, "calibserve_calibration_samples_total", model="m", method="verify",
                  bin="3") == 1
    assert sample(text, "calibserve_calibration_samples_total", model="m", method="answer",
                  bin="13") == 1
    assert sample(text, "calibserve_calibration_samples_total", model="m", method="answer",
                  bin="7") == 1
    assert sample(text, "calibserve_calibration_samples_total", model="m", method="verify",
                  bin="13") == 0
    assert sample(text, "calibserve_ece", model="m", method="verify") == pytest.approx(0.8)
    metrics.confidence.labels("m", "verify").observe(0.3)
    assert sample(metrics.render().decode(), "calibserve_confidence_count", model="m",
                  method="verify") == 1

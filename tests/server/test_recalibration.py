"""server/recalibration.py: shadow and on modes, the swap, thresholds, persistence, replicas.

The runtime is built from settings and never started (no upstream is contacted); samples are fed
as probes and feedback would feed them. A real engine drill is benchmarks/drift_drill.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from calibserve.calibration import CalibrationDocument
from calibserve.server.config import ServerSettings
from calibserve.server.runtime import ServerRuntime
from calibserve.testing.checks import sample
from tests.calibration.test_online import overconfident

DOC = {
    "version": 2, "multiple_choice": "answer", "free_form": "mean",
    "methods": {
        "answer": {"calibrator": {"type": "temperature", "temperature": 1.0},
                   "thresholds": [{"target_accuracy": 0.6, "threshold": 0.7, "coverage": 0.5}],
                   "fit": {"n": 320, "ece_raw": 0.1, "ece_calibrated": 0.03}},
        "mean": {},
    },
}


def runtime(tmp_path: Path, mode: str, store: Path | None = None,
            doc: dict[str, object] | None = None) -> ServerRuntime:
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps(DOC if doc is None else doc))
    return ServerRuntime(ServerSettings.model_validate({
        "signing_key": "k", "recalibrate": mode,
        "recalibration_dir": str(store) if store else None,
        "models": [{"name": "m", "upstreams": ["http://127.0.0.1:9"], "upstream_model": "m",
                    "calibration": str(cal), "threshold": "auto", "target_accuracy": 0.6,
                    "escalate_to": [{"name": "x", "upstreams": ["http://127.0.0.1:9"]}]}],
    }))


def feed(rt: ServerRuntime, n: int = 1000, method: str = "answer") -> None:
    recal = rt.recalibrators["m"]
    for r, y in zip(*overconfident(n), strict=True):
        recal.observe(method, float(r), bool(y))


def metrics(rt: ServerRuntime) -> str:
    return generate_latest(rt.metrics.registry).decode()


def test_off_builds_nothing(tmp_path: Path) -> None:
    rt = runtime(tmp_path, "off")
    assert rt.recalibrators == {} and "calibserve_calibrator_version" not in metrics(rt)


def test_shadow_exports_the_candidate_and_serves_nothing_new(tmp_path: Path) -> None:
    rt = runtime(tmp_path, "shadow", tmp_path / "store")
    scorer = rt.models["m"].primary.tier.scorer
    feed(rt)
    text = metrics(rt)
    candidate = sample(text, "calibserve_recalibration_candidate_ece", model="m", method="answer")
    current = sample(text, "calibserve_recalibration_current_ece", model="m", method="answer")
    assert candidate < current - 0.02  # a better candidate is reported ...
    assert rt.models["m"].primary.tier.scorer is scorer  # ... and not served
    assert sample(text, "calibserve_calibrator_version", model="m", method="answer") == 0
    assert sample(text, "calibserve_recalibrations_total", model="m", method="answer",
                  outcome="shadow") >= 1
    assert not (tmp_path / "store").exists()


def test_on_swaps_recomputes_thresholds_persists_and_survives_a_restart(tmp_path: Path) -> None:
    store = tmp_path / "store"
    rt = runtime(tmp_path, "on", store)
    model = rt.models["m"]
    old_policy = model.route.policy
    feed(rt)
    text = metrics(rt)
    version = sample(text, "calibserve_calibrator_version", model="m", method="answer")
    assert version >= 1
    assert sample(text, "calibserve_recalibrations_total", model="m", method="answer",
                  outcome="swapped") == version
    # The served map is the refitted one: overconfident raws are pulled down.
    assert model.primary.tier.scorer.calibrate(0.95) < 0.9
    assert model.primary.tier.scorer is model.primary.scorer
    # `auto` thresholds come from the new map, for the same accuracy target.
    assert model.route.policy is not old_policy
    new_threshold = model.route.policy.threshold_for("answer")  # type: ignore[attr-defined]
    assert new_threshold is not None and new_threshold != 0.7
    before = sample(text, "calibserve_recalibration_escalation_rate", model="m",
                    method="answer", when="before")
    after = sample(text, "calibserve_recalibration_escalation_rate", model="m", method="answer",
                   when="after")
    assert 0 <= before <= 1 and 0 <= after <= 1
    stored = CalibrationDocument.load(store / "m" / "calibration.json")
    assert stored.metrics["recalibration"]["version"] == version
    assert (store / "m" / "history" / f"v{int(version)}.json").is_file()
    # The drift rules now compare against the new map's fit (its window).
    fit = stored.method("answer").fit
    assert fit is not None and fit.confidence_quantiles is not None
    assert sample(text, "calibserve_calibration_fit_ece", model="m", method="answer") == \
        pytest.approx(fit.ece_calibrated)
    # A restart (or another replica sharing the store) serves the stored map.
    again = runtime(tmp_path, "on", store)
    assert again.recalibrators["m"].version == version
    assert again.models["m"].primary.tier.scorer.calibrate(0.95) == pytest.approx(
        model.primary.tier.scorer.calibrate(0.95))
    # `off` is the way back: the checkpoint's calibration.json, unchanged.
    off = runtime(tmp_path, "off", store)
    assert off.models["m"].primary.tier.scorer.calibrate(0.95) == pytest.approx(0.95)


def test_a_calibrated_window_keeps_the_map(tmp_path: Path) -> None:
    rt = runtime(tmp_path, "on", tmp_path / "store")
    recal = rt.recalibrators["m"]
    rng = np.random.default_rng(3)
    for r in rng.uniform(0.3, 1.0, 1000):
        recal.observe("answer", float(r), bool(rng.uniform() < r))
    text = metrics(rt)
    assert sample(text, "calibserve_calibrator_version", model="m", method="answer") == 0
    assert sample(text, "calibserve_recalibrations_total", model="m", method="answer",
                  outcome="kept") >= 1


def test_feedback_feeds_the_window(tmp_path: Path) -> None:
    from calibserve.server.openai_schema import FeedbackRequest

    rt = runtime(tmp_path, "shadow")
    recal = rt.recalibrators["m"]
    rid = rt.signer.issue("chatcmpl-", "m", [0.9], [0.95], methods=["answer"])
    rt.feedback.record(FeedbackRequest(id=rid, correct=False))
    assert list(recal._samples["answer"]) == [(0.95, False)]  # noqa: SLF001
    # Feedback for the escalation tier's label is not the primary's calibration.
    rid = rt.signer.issue("chatcmpl-", "m:x", [0.9], [0.95], methods=["answer"])
    rt.feedback.record(FeedbackRequest(id=rid, correct=True))
    assert len(recal._samples["answer"]) == 1  # noqa: SLF001


def test_a_replica_adopts_the_swap_another_made(tmp_path: Path) -> None:
    store = tmp_path / "store"
    a, b = runtime(tmp_path, "on", store), runtime(tmp_path, "on", store)
    feed(a)
    version = a.recalibrators["m"].version
    assert version >= 1 and b.recalibrators["m"].version == 0
    b.recalibrators["m"].step("answer")  # B's next refit looks at the store first
    assert b.recalibrators["m"].version == version
    assert b.models["m"].primary.tier.scorer.calibrate(0.95) == pytest.approx(
        a.models["m"].primary.tier.scorer.calibrate(0.95))
    assert sample(metrics(b), "calibserve_recalibrations_total", model="m", method="answer",
                  outcome="adopted") == 1


def test_no_letter_is_refitted_on_its_own_window_when_the_document_has_it(tmp_path: Path) -> None:
    doc = json.loads(json.dumps(DOC))
    doc["methods"]["no_letter"] = {"fit": {"n": 4, "ece_raw": 0.0, "ece_calibrated": 0.0,
                                           "notes": ["too few letterless replies"]}}
    rt = runtime(tmp_path, "on", tmp_path / "store", doc=doc)
    recal, model = rt.recalibrators["m"], rt.models["m"]
    assert recal.methods == ("answer", "mean", "no_letter")
    assert not model.primary.scorer.no_letter.calibrated
    feed(rt, method="no_letter")
    scorer = model.primary.tier.scorer
    assert scorer.no_letter.calibrated and scorer.no_letter.score(0.95) < 0.9
    assert scorer.calibrate(0.95) == pytest.approx(0.95)  # answer's map is untouched
    assert "answer" not in recal._samples  # noqa: SLF001 - the windows never mix
    assert sample(metrics(rt), "calibserve_recalibrations_total", model="m",
                  method="no_letter", outcome="swapped") >= 1


def test_no_letter_without_an_entry_is_not_collected(tmp_path: Path) -> None:
    rt = runtime(tmp_path, "on", tmp_path / "store")
    recal = rt.recalibrators["m"]
    assert "no_letter" not in recal.methods
    feed(rt, method="no_letter")
    assert recal._samples == {}  # noqa: SLF001
    assert not rt.models["m"].primary.tier.scorer.no_letter.calibrated

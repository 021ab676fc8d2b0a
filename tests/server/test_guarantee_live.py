"""`--threshold guaranteed` served and kept true live: the policy, the live bound's gauges fed by
feedback and probes, and re-certification with `--recalibrate on` (server/guarantee.py,
server/recalibration.py). The runtime is built from settings and never started."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from calibserve.calibration import CalibrationDocument
from calibserve.calibration.guarantee import (
    batch_error_target,
    certify_threshold,
    clopper_pearson_upper,
)
from calibserve.routing.policy import ThresholdPolicy
from calibserve.server.config import ServerSettings
from calibserve.server.guarantee import KeptWindow
from calibserve.server.openai_schema import FeedbackRequest
from calibserve.server.runtime import ServerRuntime
from calibserve.testing.checks import sample, total

CERT = {"max_error": 0.2, "delta": 0.1, "threshold": 0.5, "coverage": 0.8, "bound": 0.19,
        "n": 500, "kept": 400, "kept_errors": 60}
DOC: dict[str, Any] = {
    "version": 2, "multiple_choice": "answer", "free_form": "mean",
    "methods": {
        "answer": {"calibrator": {"type": "temperature", "temperature": 1.0},
                   "thresholds": [{"target_accuracy": 0.8, "threshold": 0.45, "coverage": 0.9}],
                   "guarantees": [CERT, {**CERT, "max_error": 0.1, "threshold": 0.8,
                                         "bound": 0.09, "kept": 100, "coverage": 0.2,
                                         "kept_errors": 4}],
                   "fit": {"n": 500, "ece_raw": 0.05, "ece_calibrated": 0.03}},
        "mean": {},
    },
}


def runtime(tmp_path: Path, mode: str = "off", max_error: float | None = 0.2,
            probes: bool = False, doc: dict[str, Any] | None = None) -> ServerRuntime:
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps(DOC if doc is None else doc))
    model: dict[str, Any] = {
        "name": "m", "upstreams": ["http://127.0.0.1:9"], "upstream_model": "m",
        "calibration": str(cal), "threshold": "guaranteed", "max_error": max_error,
        "escalate_to": [{"name": "x", "upstreams": ["http://127.0.0.1:9"]}]}
    settings: dict[str, Any] = {"signing_key": "k", "recalibrate": mode,
                                "recalibration_dir": str(tmp_path / "store"), "models": [model]}
    if probes:
        probe_file = tmp_path / "probes.jsonl"
        probe_file.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0})
                              + "\n")
        settings["probe_rate"] = 1.0
        model["probe_data"] = str(probe_file)
    return ServerRuntime(ServerSettings.model_validate(settings))


def metrics(rt: ServerRuntime) -> str:
    return generate_latest(rt.metrics.registry).decode()


def feedback(rt: ServerRuntime, raw: float, correct: bool, label: str = "m") -> None:
    rid = rt.signer.issue("chatcmpl-", label, [raw], [raw], methods=["answer"])
    rt.feedback.record(FeedbackRequest(id=rid, correct=correct))


def test_the_policy_serves_the_certified_thresholds() -> None:
    doc = CalibrationDocument.from_dict(DOC)
    assert ThresholdPolicy.guaranteed(doc, 0.2).threshold_for("answer") == 0.5
    assert ThresholdPolicy.guaranteed(doc, 0.15).threshold_for("answer") == 0.8  # stricter one
    assert ThresholdPolicy.guaranteed(doc).threshold_for("answer") == 0.8  # the strictest
    with pytest.raises(ValueError, match="no certified threshold at max_error 0.05"):
        ThresholdPolicy.guaranteed(doc, 0.05)
    # `mean` has no certificate: judged by the multiple-choice method's, as `auto` does.
    assert ThresholdPolicy.guaranteed(doc, 0.2).threshold_for("mean") == 0.5


def test_settings_and_flags(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_error is for threshold: guaranteed"):
        ServerSettings.model_validate({"models": [{
            "name": "m", "upstreams": ["http://a:1"], "threshold": "auto", "max_error": 0.2}]})
    from typer.testing import CliRunner

    import calibserve.server.cli

    seen: list[ServerSettings] = []
    original = calibserve.server.cli.run_server
    calibserve.server.cli.run_server = seen.append  # type: ignore[assignment]
    try:
        result = CliRunner().invoke(calibserve.server.cli.app, [
            "serve", "--upstream", "http://a:1", "--served-model-name", "m", "--escalate-to",
            "http://b:1", "--threshold", "guaranteed", "--max-error", "0.2"])
    finally:
        calibserve.server.cli.run_server = original
    assert result.exit_code == 0, result.output
    (m,) = seen[0].models
    assert m.threshold == "guaranteed" and m.max_error == 0.2


def test_feedback_sets_the_live_bound(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    assert rt.models["m"].route.policy.threshold_for("answer") == 0.5  # type: ignore[attr-defined]
    text = metrics(rt)
    assert sample(text, "calibserve_guarantee_max_error", model="m", method="answer") == 0.2
    assert sample(text, "calibserve_guarantee_threshold", model="m", method="answer") == 0.5
    assert sample(text, "calibserve_guarantee_kept_error_bound", model="m", method="answer") == 1
    for i in range(20):
        feedback(rt, 0.9, correct=i >= 2)  # 20 kept, 2 wrong
    for _ in range(5):
        feedback(rt, 0.3, correct=False)  # below the threshold: escalated, not kept
    feedback(rt, 0.9, correct=False, label="m:x")  # the expert's answer: not the primary's
    text = metrics(rt)
    assert sample(text, "calibserve_guarantee_kept_answers", model="m", method="answer") == 20
    assert sample(text, "calibserve_guarantee_kept_errors", model="m", method="answer") == 2
    bound = sample(text, "calibserve_guarantee_kept_error_bound", model="m", method="answer")
    # 2 errors of 20 at delta 0.1: P(Bin(20, p) <= 2) = 0.1 at p = 0.24477 (by hand below).
    assert bound == pytest.approx(0.244765, abs=1e-5)
    tail = sum(math.comb(20, j) * bound**j * (1 - bound) ** (20 - j) for j in range(3))
    assert tail == pytest.approx(0.1, abs=1e-5)
    # The lower bound: P(Bin(20, p) >= 2) = 1 - (1-p)^20 - 20 p (1-p)^19 = 0.1 at p = 0.02691.
    lower = sample(text, "calibserve_guarantee_kept_error_lower_bound", model="m",
                   method="answer")
    assert lower == pytest.approx(0.026914, abs=1e-5)
    assert 1 - (1 - lower) ** 20 - 20 * lower * (1 - lower) ** 19 == pytest.approx(0.1, abs=1e-6)


def test_probes_feed_the_window_too(tmp_path: Path) -> None:
    rt = runtime(tmp_path, probes=True)
    (runner,) = rt.probes
    assert runner.on_outcome is not None
    runner.on_outcome("answer", 0.95, False)
    runner.on_outcome("answer", 0.2, False)  # would have been escalated
    text = metrics(rt)
    assert sample(text, "calibserve_guarantee_kept_answers", model="m", method="answer") == 1
    assert sample(text, "calibserve_guarantee_kept_errors", model="m", method="answer") == 1


def test_the_window_slides_and_rescoring_follows_the_threshold() -> None:
    from calibserve.calibration import ServedMethod

    w = KeptWindow(3, threshold=0.5, delta=0.1)
    for raw, y in [(0.9, False), (0.8, True), (0.1, False), (0.7, True)]:
        w.add(raw, raw, y)
    assert (w.kept, w.kept_errors) == (2, 0)  # the first (kept, wrong) answer slid out
    w.rescore(ServedMethod("answer", None), threshold=0.05, delta=0.1)
    assert (w.kept, w.kept_errors) == (3, 1)


def _calibrated_window(n: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = rng.uniform(0.3, 1.0, n)
    return raw, rng.uniform(size=n) < raw  # calibrated: kept error at t is (1 - t) / 2


def test_recalibrate_on_recertifies_a_broken_threshold(tmp_path: Path) -> None:
    rt = runtime(tmp_path, mode="on")
    raw, y = _calibrated_window(1000)
    # The served 0.5 keeps answers wrong 25% of the time on this traffic: above 0.2.
    for r, c in zip(raw, y, strict=True):
        feedback(rt, float(r), bool(c))
    model = rt.models["m"]
    new = model.route.policy.threshold_for("answer")  # type: ignore[attr-defined]
    assert new is not None and new > 0.55
    # Certified on the window it was swapped on (the first `size` answers fed: the window
    # holds 1000), by the same fixed-sequence scan as at fit time.
    served = CalibrationDocument.load(tmp_path / "store" / "m" / "calibration.json")
    size = served.metrics["recalibration"]["recertified"]["window"]
    assert served.metrics["recalibration"]["recertified"]["threshold_after"] == new
    assert new == certify_threshold(raw[:size], y[:size], 0.2, 0.1).threshold
    text = metrics(rt)
    assert sample(text, "calibserve_recalibrations_total", model="m", method="answer",
                  outcome="recertified") >= 1
    assert sample(text, "calibserve_guarantee_threshold", model="m", method="answer") == new
    # The live gauges were re-scored under the new threshold: its kept answers meet 0.2.
    kept = sample(text, "calibserve_guarantee_kept_answers", model="m", method="answer")
    errors = sample(text, "calibserve_guarantee_kept_errors", model="m", method="answer")
    assert kept == int((raw[-1000:] >= new).sum()) and errors / kept <= 0.2
    stored = CalibrationDocument.load(tmp_path / "store" / "m" / "calibration.json")
    assert stored.method("answer").guarantee_for(0.2).threshold == new  # type: ignore[union-attr]
    assert stored.method("answer").guarantee_for(0.1).threshold == 0.8  # other target untouched


def _recertified(tmp_path: Path, doc: dict[str, Any]
                 ) -> tuple[float, CalibrationDocument, tuple[np.ndarray, np.ndarray]]:
    """Serve `doc` with `--recalibrate on`, feed a calibrated window of 1000: the threshold
    served after, the document stored, and the window's (raw, correct) it re-certified on."""
    rt = runtime(tmp_path, mode="on", doc=doc)
    raw, y = _calibrated_window(1000)
    for r, c in zip(raw, y, strict=True):
        feedback(rt, float(r), bool(c))
    new = rt.models["m"].route.policy.threshold_for("answer")  # type: ignore[attr-defined]
    served = CalibrationDocument.load(tmp_path / "store" / "m" / "calibration.json")
    size = served.metrics["recalibration"]["recertified"]["window"]
    return new, served, (raw[:size], y[:size])


def test_a_batch_certificate_is_recertified_as_one(tmp_path: Path) -> None:
    beta = batch_error_target(0.2, 0.1, 50)
    batch_doc = json.loads(json.dumps(DOC))
    batch_doc["methods"]["answer"]["guarantees"][0].update(
        bound=beta - 0.01, batch=50, batch_target=beta)
    new, served, (raw, y) = _recertified(tmp_path, batch_doc)
    assert new == certify_threshold(raw, y, 0.2, 0.1, batch=50).threshold
    assert new > certify_threshold(raw, y, 0.2, 0.1).threshold  # stricter
    g = served.method("answer").guarantee_for(0.2)
    assert g is not None and (g.batch, g.batch_target) == (50, beta) and g.bound <= beta


def test_a_certificate_of_several_starts_is_recertified_with_them(tmp_path: Path) -> None:
    doc = json.loads(json.dumps(DOC))
    doc["methods"]["answer"]["guarantees"][0]["starts"] = 3
    new, served, (raw, y) = _recertified(tmp_path, doc)
    three = certify_threshold(raw, y, 0.2, 0.1, starts=3)
    assert new == three.threshold != certify_threshold(raw, y, 0.2, 0.1).threshold
    g = served.method("answer").guarantee_for(0.2)
    assert g is not None and g.starts == 3 and g.bound == pytest.approx(three.bound)


def test_shadow_exports_the_recertified_candidate_only(tmp_path: Path) -> None:
    rt = runtime(tmp_path, mode="shadow")
    raw, y = _calibrated_window(1000)
    for r, c in zip(raw, y, strict=True):
        feedback(rt, float(r), bool(c))
    text = metrics(rt)
    assert sample(text, "calibserve_recalibration_candidate_threshold", model="m",
                  method="answer") > 0.55
    assert rt.models["m"].route.policy.threshold_for("answer") == 0.5  # type: ignore[attr-defined]
    bound = sample(text, "calibserve_guarantee_kept_error_bound", model="m", method="answer")
    assert bound > 0.2  # the live bound says the promise is broken


def test_serving_a_target_the_document_has_no_certificate_for_is_a_clean_error(
        tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import calibserve.server.cli

    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps(DOC))
    config = tmp_path / "calibserve.yaml"
    config.write_text(
        "models:\n  - name: m\n    upstreams: [http://127.0.0.1:9]\n    upstream_model: m\n"
        f"    calibration: {cal}\n    threshold: guaranteed\n    max_error: 0.05\n"
        "    escalate_to:\n      - name: x\n        upstreams: [http://127.0.0.1:9]\n")
    result = CliRunner().invoke(calibserve.server.cli.app, ["serve", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "no certified threshold at max_error 0.05" in result.output
    assert "certified max_error: 0.1, 0.2" in result.output and "Traceback" not in result.output


def test_a_middle_tier_is_watched_by_its_own_certificate(tmp_path: Path) -> None:
    """A route of three tiers under `guaranteed`: the middle tier's answers (its feedback, label
    `m:mid`) fill a window of its own, judged by its own certified threshold; the primary's
    window stays the primary's and the last tier (nothing to escalate to) has none."""
    middle_doc = json.loads(json.dumps(DOC))
    middle_doc["methods"]["answer"]["guarantees"] = [
        {**CERT, "threshold": 0.7, "tier": 1, "tiers": 3, "after": ["m"]}]
    (tmp_path / "mid.json").write_text(json.dumps(middle_doc))
    (tmp_path / "calibration.json").write_text(json.dumps(DOC))
    rt = ServerRuntime(ServerSettings.model_validate({"signing_key": "k", "models": [{
        "name": "m", "upstreams": ["http://127.0.0.1:9"], "upstream_model": "m",
        "calibration": str(tmp_path / "calibration.json"), "threshold": "guaranteed",
        "max_error": 0.2, "escalate_to": [
            {"name": "mid", "upstreams": ["http://127.0.0.1:9"],
             "calibration": str(tmp_path / "mid.json")},
            {"name": "x", "upstreams": ["http://127.0.0.1:9"]}]}]}))
    assert set(rt.live_guarantees) == {"m", "m:mid"}
    text = metrics(rt)
    assert sample(text, "calibserve_guarantee_threshold", model="m", method="answer") == 0.5
    assert sample(text, "calibserve_guarantee_threshold", model="m:mid", method="answer") == 0.7
    for i in range(10):
        feedback(rt, 0.8, correct=i >= 3, label="m:mid")  # kept by the middle's 0.7: 3 wrong
    feedback(rt, 0.6, correct=False, label="m:mid")  # the primary would keep it, the middle not
    feedback(rt, 0.9, correct=False, label="m:x")  # the last tier's: watched by no window
    text = metrics(rt)
    assert sample(text, "calibserve_guarantee_kept_answers", model="m:mid", method="answer") == 10
    assert sample(text, "calibserve_guarantee_kept_errors", model="m:mid", method="answer") == 3
    assert sample(text, "calibserve_guarantee_kept_answers", model="m", method="answer") == 0
    assert sample(text, "calibserve_guarantee_kept_error_bound", model="m:mid",
                  method="answer") == pytest.approx(clopper_pearson_upper(3, 10, 0.1))


class StubUpstream:
    """A stand-in for one tier's upstream client (no HTTP): answers every chat request with the
    letter A at probability `p` (B the rest), or fails; counts what it was asked."""

    def __init__(self, p: float) -> None:
        self.p, self.asked, self.fail = p, 0, False

    async def request_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.asked += 1
        if self.fail:
            raise ConnectionError("upstream down")
        tops = [{"token": "A", "logprob": math.log(self.p)},
                {"token": "B", "logprob": math.log(1 - self.p)}]
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "A"},
                             "logprobs": {"content": [{"token": "A", "logprob": math.log(self.p),
                                                       "top_logprobs": tops}]}}]}


def test_probes_walk_on_to_a_judged_middle_tier(tmp_path: Path) -> None:
    """On a route of three under `guaranteed`, a probe the primary's certified threshold would
    escalate is asked of the middle tier and fills the middle tier's window (label `m:mid`);
    one the primary keeps stops there; the last tier, judged by nothing, is never asked; a
    failing middle tier is counted as a probe error under its label and records nothing."""
    import asyncio

    middle_doc = json.loads(json.dumps(DOC))
    middle_doc["methods"]["answer"]["guarantees"] = [
        {**CERT, "threshold": 0.7, "tier": 1, "tiers": 3, "after": ["m"]}]
    (tmp_path / "mid.json").write_text(json.dumps(middle_doc))
    (tmp_path / "calibration.json").write_text(json.dumps(DOC))
    probe_file = tmp_path / "probes.jsonl"
    probe_file.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n")
    rt = ServerRuntime(ServerSettings.model_validate({"signing_key": "k", "probe_rate": 1.0,
                                                      "models": [{
        "name": "m", "upstreams": ["http://127.0.0.1:9"], "upstream_model": "m",
        "calibration": str(tmp_path / "calibration.json"), "threshold": "guaranteed",
        "max_error": 0.2, "probe_data": str(probe_file), "escalate_to": [
            {"name": "mid", "upstreams": ["http://127.0.0.1:9"],
             "calibration": str(tmp_path / "mid.json")},
            {"name": "x", "upstreams": ["http://127.0.0.1:9"]}]}]}))
    stubs = [StubUpstream(0.4), StubUpstream(0.9), StubUpstream(0.99)]
    for tier, stub in zip(rt.models["m"].tiers, stubs, strict=True):
        tier.tier.upstream = stub  # type: ignore[assignment]
    (runner,) = rt.probes
    assert [t.label for t in runner.onward] == ["m:mid"]

    def kept(label: str) -> tuple[float | None, float | None]:
        text = metrics(rt)
        return (sample(text, "calibserve_guarantee_kept_answers", model=label, method="answer"),
                sample(text, "calibserve_guarantee_kept_errors", model=label, method="answer"))

    asyncio.run(runner.ask(runner.next_probe()))  # 0.4 < the primary's 0.5: on to the middle
    assert [s.asked for s in stubs] == [1, 1, 0]
    assert kept("m") == (0, 0) and kept("m:mid") == (1, 0)  # 0.9 >= 0.7: kept, right
    text = metrics(rt)
    assert sample(text, "calibserve_probes_total", model="m:mid", outcome="ok") == 1
    bins = rt.metrics.render().decode()  # the per-bin counters: live ECE of the middle tier
    assert total(bins, "calibserve_calibration_samples_total", source="probe", model="m:mid") == 1
    assert total(bins, "calibserve_calibration_samples_total", source="probe", model="m") == 1

    stubs[0].p = 0.6  # the primary keeps it: the walk stops at the primary
    asyncio.run(runner.ask(runner.next_probe()))
    assert [s.asked for s in stubs] == [2, 1, 0]
    assert kept("m") == (1, 0) and kept("m:mid") == (1, 0)

    stubs[0].p, stubs[1].fail = 0.4, True
    asyncio.run(runner.ask(runner.next_probe()))
    assert [s.asked for s in stubs] == [3, 2, 0]
    text = metrics(rt)
    assert sample(text, "calibserve_probes_total", model="m:mid", outcome="error") == 1
    assert kept("m:mid") == (1, 0)

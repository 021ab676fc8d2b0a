"""The server's wiring of routing/: policies from config, escalation fields and headers.

Both tiers point at the fake upstream (its confidence is fixed at about 0.76), so the threshold
alone decides; escalation quality with real models is routing's integration test.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from calibserve.calibration import CalibrationDocument, CalibrationError
from calibserve.server.config import ServerSettings
from calibserve.server.runtime import ServerRuntime
from tests.server.conftest import FakeUpstream, serve

CHAT = {"model": "m", "messages": [{"role": "user", "content": "question : ?"}]}
OPTION_PROMPT = [{"role": "user", "content": "question : ? A x B y C z D w"}]


def settings(fake: str, expert: str, **route: object) -> ServerSettings:
    return ServerSettings.model_validate({
        "signing_key": "k",
        "models": [{"name": "m", "upstreams": [fake], "upstream_model": "fake-model",
                    "escalate_to": [{"name": "expert", "upstreams": [expert],
                                     "upstream_model": "fake-model"}], **route}],
    })


@pytest.mark.parametrize("threshold, escalated", [(0.9, True), (0.5, False)])
def test_threshold_decides(fake_upstream: FakeUpstream, threshold: float, escalated: bool
                           ) -> None:
    fake_upstream.mode("ok")
    with serve(settings(fake_upstream.url, fake_upstream.url, threshold=threshold)) as running:
        r = httpx.post(f"{running.url}/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 200, r.text
        info = r.json()["calibserve"]
        assert info["escalated"] is escalated
        assert info["served_by"] == ("expert" if escalated else "m")
        assert info["threshold"] == threshold
        assert r.headers["x-calibserve-escalated"] == json.dumps(escalated)
        assert r.headers["x-calibserve-served-by"] == info["served_by"]
        with httpx.stream("POST", f"{running.url}/v1/chat/completions",
                          json={**CHAT, "stream": True}, timeout=10) as s:
            assert s.headers["x-calibserve-served-by"] == info["served_by"]
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2])["calibserve"]["escalated"] is escalated
        # No calibration.json: every confidence, batch or streamed, says it is uncalibrated.
        streamed = [c["confidence"] for e in events[:-1] for c in json.loads(e).get("choices", [])
                    if "confidence" in c]
        assert streamed and all(c["calibrated"] is False for c in streamed)
        assert r.json()["choices"][0]["confidence"]["calibrated"] is False
        # Feedback is counted under the tier that answered, never mixed into the primary's ECE.
        label = "m:expert" if escalated else "m"
        for rid in (r.json()["id"], json.loads(events[-2])["id"]):
            fb = httpx.post(f"{running.url}/v1/feedback", json={"id": rid, "correct": True},
                            timeout=10)
            assert fb.status_code == 200 and fb.json()["model"] == label, fb.text
        text = httpx.get(f"{running.url}/metrics", timeout=10).text
        # ... and under the method that scored it (no calibration.json: `mean`).
        assert (f'calibserve_calibration_samples_total{{bin="11",method="mean",'
                f'model="{label}",source="feedback"}} 2.0') in text


def test_an_escalation_tier_is_scored_with_its_own_calibration(fake_upstream: FakeUpstream,
                                                               tmp_path) -> None:
    """Without calibration.json the expert's answers are served with the raw `mean` confidence;
    with one (temperature 3) they are pulled towards 0.5, as that tier's calibrator says."""
    fake_upstream.mode("ok")
    cal = tmp_path / "expert.json"
    cal.write_text(json.dumps({"version": 1, "confidence": {"method": "mean"},
                               "calibrator": {"type": "temperature", "temperature": 3.0}}))
    confidence = {}
    for name, calibration in (("raw", None), ("calibrated", cal)):
        s = settings(fake_upstream.url, fake_upstream.url, threshold=0.9)
        tier = s.models[0].escalate_to[0].model_copy(update={"calibration": calibration})
        model = s.models[0].model_copy(update={"escalate_to": [tier]})
        with serve(s.model_copy(update={"models": [model]})) as running:
            r = httpx.post(f"{running.url}/v1/chat/completions", json=CHAT, timeout=10)
            assert r.status_code == 200 and r.json()["calibserve"]["served_by"] == "expert"
            confidence[name] = r.json()["choices"][0]["confidence"]
    raw = confidence["raw"]["score"]
    assert raw == confidence["raw"]["raw"] > 0.7  # identity calibrator
    assert confidence["raw"]["calibrated"] is False and confidence["calibrated"]["calibrated"]
    assert confidence["calibrated"]["raw"] == pytest.approx(raw)
    expected = 1 / (1 + ((1 - raw) / raw) ** (1 / 3))  # sigmoid(logit(raw) / 3)
    assert confidence["calibrated"]["score"] == pytest.approx(expected, abs=1e-6)


def test_dead_expert_degrades_to_primary(fake_upstream: FakeUpstream) -> None:
    fake_upstream.mode("ok")
    with serve(settings(fake_upstream.url, "http://127.0.0.1:9", threshold=0.9)) as running:
        r = httpx.post(f"{running.url}/v1/chat/completions", json=CHAT, timeout=10)
        info = r.json()["calibserve"]
        assert r.status_code == 200 and info["served_by"] == "m" and not info["escalated"]
        assert "expert" in info["escalation_error"]


def test_auto_threshold_needs_calibration_json(fake_upstream: FakeUpstream) -> None:
    with pytest.raises(ValueError, match="calibration.json"):
        ServerRuntime(settings(fake_upstream.url, fake_upstream.url, threshold="auto"))


def _answer_only(tmp_path, thresholds: list[dict[str, float]], options: str = "ABCD"):
    """A v2 document as merge writes it: only `answer` (option letters) has a calibrator."""
    path = tmp_path / f"calibration-{options}.json"
    CalibrationDocument.from_dict({
        "version": 2,
        "methods": {"answer": {"params": {"options": list(options), "temperature": 1.0},
                               "calibrator": {"type": "temperature", "temperature": 3.0},
                               "thresholds": thresholds},
                    "mean": {}},
        "multiple_choice": "answer", "free_form": "mean",
    }).write(path)
    return path


def test_auto_threshold_comes_from_the_primary_document(fake_upstream: FakeUpstream,
                                                         tmp_path) -> None:
    cal = _answer_only(tmp_path, [{"target_accuracy": 0.8, "threshold": 0.63, "coverage": 0.5},
                                  {"target_accuracy": 0.9, "threshold": 0.7, "coverage": 0.3}])
    s = settings(fake_upstream.url, fake_upstream.url, threshold="auto", target_accuracy=0.8)
    model = s.models[0].model_copy(update={"calibration": cal})
    runtime = ServerRuntime(s.model_copy(update={"models": [model]}))
    assert runtime.models["m"].route.policy.threshold == 0.63  # type: ignore[attr-defined]


def test_a_bad_document_is_refused_at_start_naming_file_and_version(
        fake_upstream: FakeUpstream, tmp_path) -> None:
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"version": 9}))
    s = settings(fake_upstream.url, fake_upstream.url, threshold=0.5)
    model = s.models[0].model_copy(update={"calibration": cal})
    with pytest.raises(CalibrationError, match=f"{cal}: unsupported .*version 9.*1, 2"):
        ServerRuntime(s.model_copy(update={"models": [model]}))


def test_a_free_form_reply_is_not_given_the_option_letter_map(fake_upstream: FakeUpstream,
                                                              tmp_path) -> None:
    """The fake answers "A t1 t2 ..." to a prompt listing options A-D. With the document's
    options W-Z the prompt offers none of them: a free-form reply, scored by `mean`, which has
    no calibrator of its own, so it is served raw, never through `answer`'s map; with options
    A-D it is an option-letter reply and gets that map."""
    fake_upstream.mode("ok")
    confidence = {}
    for options in ("WXYZ", "ABCD"):
        s = settings(fake_upstream.url, fake_upstream.url, threshold=0.0)
        cal = _answer_only(tmp_path, [], options)
        model = s.models[0].model_copy(update={"calibration": cal})
        with serve(s.model_copy(update={"models": [model]})) as running:
            r = httpx.post(f"{running.url}/v1/chat/completions",
                           json={**CHAT, "messages": OPTION_PROMPT, "logprobs": True,
                                 "top_logprobs": 3}, timeout=10)
        assert r.status_code == 200, r.text
        confidence[options] = r.json()["choices"][0]["confidence"]
    free, mc = confidence["WXYZ"], confidence["ABCD"]
    assert free["method"] == "mean" and free["score"] == free["raw"] > 0.5
    assert free["calibrated"] is False
    assert mc["method"] == "answer" and mc["score"] < mc["raw"]  # temperature 3 softens
    assert mc["calibrated"] is True


# --- routes of three tiers: every tier but the last judged by its own threshold ----------------

CERT = {"max_error": 0.2, "delta": 0.1, "threshold": 0.5, "coverage": 0.8, "bound": 0.19,
        "n": 500, "kept": 400, "kept_errors": 60}


def cascade(primary: str, middle: str, expert: str, middle_calibration=None,
            **route: object) -> ServerSettings:
    """primary -> middle -> expert, as `--escalate-to MIDDLE --escalate-to EXPERT
    [--escalate-calibration MIDDLE.json]` builds it (the i-th calibration is the i-th tier's)."""
    tiers = [{"name": "middle", "upstreams": [middle], "upstream_model": "fake-model",
              "calibration": middle_calibration},
             {"name": "expert", "upstreams": [expert], "upstream_model": "fake-model",
              "timeout_s": 2.0}]
    return ServerSettings.model_validate({
        "signing_key": "k",
        "models": [{"name": "m", "upstreams": [primary], "upstream_model": "fake-model",
                    "escalate_to": tiers, **route}]})


def _temperature(tmp_path, temperature: float):
    """A v1 document: `mean` through a temperature map (below 1 sharpens: the fake's ~0.76
    becomes ~0.98 at 0.3)."""
    path = tmp_path / f"middle-{temperature}.json"
    path.write_text(json.dumps({"version": 1, "confidence": {"method": "mean"},
                                "calibrator": {"type": "temperature",
                                               "temperature": temperature}}))
    return path


@pytest.mark.parametrize("temperature, served", [(0.3, "middle"), (None, "middle+error")])
def test_a_three_tier_route_judges_the_middle_tier_by_its_own_confidence(
        fake_upstream: FakeUpstream, tmp_path, temperature: float | None, served: str) -> None:
    """Threshold 0.9 for every tier but the last. The primary (raw ~0.76) always escalates. A
    middle tier whose own map puts it at ~0.98 keeps its answer (the dead expert is never
    asked); one without a map (~0.76) is sent on to the dead expert and served with
    `escalation_error`: its answer is no longer served whatever its confidence."""
    fake_upstream.mode("ok")
    cal = None if temperature is None else _temperature(tmp_path, temperature)
    s = cascade(fake_upstream.url, fake_upstream.url, "http://127.0.0.1:9", cal, threshold=0.9)
    with serve(s) as running:
        r = httpx.post(f"{running.url}/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 200, r.text
        info = r.json()["calibserve"]
        with httpx.stream("POST", f"{running.url}/v1/chat/completions",
                          json={**CHAT, "stream": True}, timeout=10) as s_:
            assert s_.headers["x-calibserve-served-by"] == "middle"
            events = [line[6:] for line in s_.iter_lines() if line.startswith("data: ")]
        text = httpx.get(f"{running.url}/metrics", timeout=10).text
    streamed = json.loads(events[-2])["calibserve"]
    for got in (info, streamed):
        assert got["served_by"] == "middle" and got["escalated"] is True
        assert got["threshold"] == 0.9 and got["primary_confidence"] < 0.9
        primary, middle = got["judgments"]
        assert primary["tier"] == "m" and primary["escalate"] is True
        assert middle["tier"] == "middle" and middle["threshold"] == 0.9
        if served == "middle":
            assert middle["confidence"] > 0.9 and middle["escalate"] is False
            assert got["escalation_error"] is None
        else:
            assert middle["confidence"] < 0.9 and middle["escalate"] is True
            assert "expert" in got["escalation_error"]
    errors = 'calibserve_escalation_errors_total{route="m",tier="expert"}'
    assert (errors in text) == (served != "middle")


def test_a_three_tier_route_escalates_twice_when_the_middle_is_unsure(
        fake_upstream: FakeUpstream) -> None:
    fake_upstream.mode("ok")
    with serve(cascade(fake_upstream.url, fake_upstream.url, fake_upstream.url,
                       threshold=0.9)) as running:
        r = httpx.post(f"{running.url}/v1/chat/completions", json=CHAT, timeout=10)
        text = httpx.get(f"{running.url}/metrics", timeout=10).text
    info = r.json()["calibserve"]
    assert info["served_by"] == "expert" and info["reason"] == "low_confidence"
    assert [j["escalate"] for j in info["judgments"]] == [True, True]
    # Two hops, one escalated request: counted once, under the tier that answered.
    assert ('calibserve_escalations_total{reason="low_confidence",route="m",'
            'tier="expert"} 1.0') in text
    assert 'calibserve_escalations_total{reason="low_confidence",route="m",tier="middle"}' \
        not in text


def _certified(tmp_path, name: str, guarantees: list[dict]) -> Path:
    path = tmp_path / f"{name}.json"
    CalibrationDocument.from_dict({
        "version": 2, "multiple_choice": "answer", "free_form": "mean",
        "methods": {"answer": {"calibrator": {"type": "temperature", "temperature": 1.0},
                               "guarantees": guarantees} if guarantees else
                    {"calibrator": {"type": "temperature", "temperature": 1.0}},
                    "mean": {}},
    }).write(path)
    return path


def test_a_guaranteed_three_tier_route_needs_the_middle_tiers_certificate(
        fake_upstream: FakeUpstream, tmp_path) -> None:
    url = fake_upstream.url
    primary = _certified(tmp_path, "primary", [CERT])

    def build(middle_cal, max_error: float = 0.2) -> ServerRuntime:
        s = cascade(url, url, url, middle_cal, threshold="guaranteed", max_error=max_error)
        model = s.models[0].model_copy(update={"calibration": primary})
        return ServerRuntime(s.model_copy(update={"models": [model]}))

    with pytest.raises(ValueError, match="tier 'middle' has no calibration.json"):
        build(None)
    with pytest.raises(ValueError, match="tier 'middle': .*no certified threshold"):
        build(_certified(tmp_path, "uncertified", []))
    looser = {**CERT, "max_error": 0.3}  # certified for 0.3 only: not for 0.2
    with pytest.raises(ValueError, match="tier 'middle': .*max_error 0.2"):
        build(_certified(tmp_path, "loose", [looser]))
    # A certificate `calibrate --max-error` made (every item, no place in a route), or one made
    # for another place: the route's promise would not follow from it.
    with pytest.raises(ValueError, match="tier 'middle': .*calibserve calibrate.*certify"):
        build(_certified(tmp_path, "alone", [{**CERT, "threshold": 0.7}]))
    with pytest.raises(ValueError, match="tier 'middle': .*made for tier 2 of a route"):
        build(_certified(tmp_path, "elsewhere", [{**CERT, "threshold": 0.7, "tier": 2,
                                                  "tiers": 3, "after": ["m", "x"]}]))
    middle = _certified(tmp_path, "middle", [{**CERT, "threshold": 0.7, "tier": 1, "tiers": 3,
                                              "after": ["m"]}])
    route = build(middle).models["m"].route
    assert route.policy.threshold == 0.5  # type: ignore[attr-defined]
    assert route.policy_for(1).threshold == 0.7  # type: ignore[union-attr]
    assert route.policy_for(2) is None  # the expert: served as is


def test_middle_tier_policies_for_auto_budget_and_never(fake_upstream: FakeUpstream, tmp_path,
                                                        caplog) -> None:
    url = fake_upstream.url
    thresholds = [{"target_accuracy": 0.8, "threshold": 0.63, "coverage": 0.5}]
    primary = _answer_only(tmp_path, [*thresholds, {"target_accuracy": 0.95, "threshold": 0.8,
                                                    "coverage": 0.2}])

    def route(middle_cal, **kw: object):
        s = cascade(url, url, url, middle_cal, **kw)
        model = s.models[0].model_copy(update={"calibration": primary})
        return ServerRuntime(s.model_copy(update={"models": [model]})).models["m"].route

    middle = tmp_path / "middle"
    middle.mkdir()
    auto = route(_answer_only(middle, [{"target_accuracy": 0.8, "threshold": 0.71,
                                        "coverage": 0.4}]),
                 threshold="auto", target_accuracy=0.8)
    assert auto.policy_for(1).threshold == 0.71  # type: ignore[union-attr]
    with caplog.at_level("WARNING", logger="calibserve.server"):
        assert route(None, threshold="auto", target_accuracy=0.8).policy_for(1) is None
    assert "tier middle has no calibration.json" in caplog.text
    with pytest.raises(ValueError, match="tier 'middle': no threshold for target accuracy 0.95"):
        route(_answer_only(middle, thresholds), threshold="auto", target_accuracy=0.95)
    assert route(None, threshold=0.4).policy_for(1).threshold == 0.4  # type: ignore[union-attr]
    assert route(None, policy="budget", budget=0.2).policy_for(1) is None
    assert route(None, policy="never").policy_for(1) is None

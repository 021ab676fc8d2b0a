"""The server's wiring of routing/: policies from config, escalation fields and headers.

Both tiers point at the fake upstream (its confidence is fixed at about 0.76), so the threshold
alone decides; escalation quality with real models is routing's integration test.
"""

from __future__ import annotations

import json

import httpx
import pytest

from server.config import ServerSettings
from server.runtime import ServerRuntime
from tests.server.conftest import FakeUpstream, serve

CHAT = {"model": "m", "messages": [{"role": "user", "content": "question : ?"}]}


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
        # Feedback is counted under the tier that answered, never mixed into the primary's ECE.
        label = "m:expert" if escalated else "m"
        for rid in (r.json()["id"], json.loads(events[-2])["id"]):
            fb = httpx.post(f"{running.url}/v1/feedback", json={"id": rid, "correct": True},
                            timeout=10)
            assert fb.status_code == 200 and fb.json()["model"] == label, fb.text
        text = httpx.get(f"{running.url}/metrics", timeout=10).text
        assert f'calibserve_calibration_samples_total{{bin="11",model="{label}"}} 2.0' in text \
            or f'calibserve_calibration_samples_total{{model="{label}",bin="11"}} 2.0' in text


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

"""/v1/responses through calibserve, on the FAKE upstream (tests/fakes, fault injection): the
request/outcome metrics like chat's, and the free-form confidence methods that need extra
requests (consistency, verify) done by the chat path's confidence work on the same engine.
Fidelity against real vLLM is tests/server/test_fidelity.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from calibserve.calibration import CalibrationDocument
from calibserve.server.config import ServerSettings
from calibserve.testing.checks import total
from tests.server.conftest import FakeUpstream, RunningServer, serve

BODY = {"model": "fake", "input": "name a colour", "max_output_tokens": 8}


def server(fake: FakeUpstream, tmp_path: Path, free_form: str) -> Any:
    # Options the fake never answers with: its canned reply ("A t1 t2 ...") is free-form here.
    doc = CalibrationDocument.from_dict({
        "version": 2, "methods": {"answer": {"params": {"options": ["W", "X", "Y", "Z"]}},
                                  "mean": {}, free_form: {}},
        "multiple_choice": "answer", "free_form": free_form})
    path = doc.write(tmp_path / f"{free_form}.json")
    return serve(ServerSettings.model_validate({
        "signing_key": "k", "models": [{"name": "fake", "upstreams": [fake.url],
                                        "upstream_model": "fake-model", "timeout_s": 2.0,
                                        "calibration": str(path)}]}))


@pytest.fixture
def consistency(fake_upstream: FakeUpstream, tmp_path: Path) -> Iterator[RunningServer]:
    fake_upstream.mode("ok")
    with server(fake_upstream, tmp_path, "consistency") as running:
        yield running
    fake_upstream.mode("ok")


def terminal(text: str) -> dict[str, Any]:
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    done = [e for e in events if e.get("type") == "response.completed"]
    assert len(done) == 1, events
    return dict(done[0]["response"])


def metric(running: RunningServer, name: str, **labels: str) -> float:
    return total(httpx.get(running.url + "/metrics", timeout=10).text, name, **labels)


def test_responses_are_scored_by_consistency_like_chat(consistency: RunningServer) -> None:
    """The fake's k samples all repeat its reply: consistency 1.0, from one extra request per
    response (streamed or not), counted as the chat path counts it."""
    asked = {"route": "fake", "method": "consistency", "outcome": "ok"}
    before = metric(consistency, "calibserve_confidence_requests_total", **asked)
    whole = httpx.post(consistency.url + "/v1/responses", json=BODY, timeout=10)
    assert whole.status_code == 200, whole.text
    streamed = httpx.post(consistency.url + "/v1/responses", json={**BODY, "stream": True},
                          timeout=10)
    for obj in (whole.json(), terminal(streamed.text)):
        assert obj["confidence"]["method"] == "consistency"
        assert obj["confidence"]["raw"] == 1.0
        assert obj["calibserve"]["served_by"] == "fake"
    after = metric(consistency, "calibserve_confidence_requests_total", **asked)
    assert after == before + 2


def test_responses_verify_asks_the_engine(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    """verify: one prompt-only chat request to the same engine; the fake's verdict has no yes/no
    token, so the reply is served by the `mean` fallback, labelled `mean`."""
    fake_upstream.mode("ok")
    with server(fake_upstream, tmp_path, "verify") as running:
        r = httpx.post(running.url + "/v1/responses", json=BODY, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["confidence"]["method"] == "mean"
        assert metric(running, "calibserve_confidence_requests_total", route="fake",
                      method="verify", outcome="no_verdict") == 1


def test_responses_counted_under_their_outcome(consistency: RunningServer,
                                               fake_upstream: FakeUpstream) -> None:
    def counts() -> dict[tuple[str, str], float]:
        text = httpx.get(consistency.url + "/metrics", timeout=10).text
        return {(m, o): total(text, "calibserve_requests_total", model=m, endpoint="responses",
                              outcome=o)
                for m in ("", "fake") for o in ("ok", "client_error", "upstream_error")}

    url = consistency.url + "/v1/responses"
    before = counts()
    assert httpx.post(url, json=BODY, timeout=10).status_code == 200
    assert httpx.post(url, json={**BODY, "stream": True}, timeout=10).status_code == 200
    assert httpx.post(url, json={**BODY, "model": "nope"}, timeout=10).status_code == 404
    fake_upstream.mode("error400")
    assert httpx.post(url, json=BODY, timeout=10).status_code == 400
    fake_upstream.mode("error500")
    r = httpx.post(url, json=BODY, timeout=10)
    assert r.status_code == 500 and r.json()["error"]["type"] == "FakeError"  # the engine's
    assert r.headers["x-calibserve-error-source"] == "engine"
    fake_upstream.mode("hang")
    assert httpx.post(url, json=BODY, timeout=10).status_code == 504
    fake_upstream.mode("ok")
    after = counts()
    delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert delta == {("fake", "ok"): 2, ("", "client_error"): 1, ("fake", "client_error"): 1,
                     ("fake", "upstream_error"): 2}
    text = httpx.get(consistency.url + "/metrics", timeout=10).text
    assert total(text, "calibserve_request_duration_seconds_count", endpoint="responses") == 2

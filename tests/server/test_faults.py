"""Bad input and upstream faults: OpenAI-shaped errors, right statuses, and serving goes on.

The upstream here is the FAKE calibserve.testing.openai_upstream (canned answers): faults must
be injected on demand; behaviour against a real vLLM server is in test_integration.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from calibserve.server.config import ServerSettings
from calibserve.testing.checks import total
from tests.server.conftest import FakeUpstream, RunningServer, serve

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "question : ?"}]}


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.fixture(scope="module")
def proxy(fake_upstream: FakeUpstream) -> Iterator[RunningServer]:
    settings = ServerSettings.model_validate({
        "signing_key": "k", "max_body_bytes": 64 * 1024,
        "models": [{"name": "fake", "upstreams": [fake_upstream.url],
                    "upstream_model": "fake-model", "timeout_s": 1.0}],
    })
    with serve(settings) as running:
        yield running
    fake_upstream.mode("ok")


@pytest.fixture
def client(proxy: RunningServer, fake_upstream: FakeUpstream) -> Iterator[httpx.Client]:
    fake_upstream.mode("ok")
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        yield c
    fake_upstream.mode("ok")


def still_serving(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    assert 0 <= r.json()["choices"][0]["confidence"]["score"] <= 1


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b'{"model": "fake", "messages": "hello"}', "messages"),
    (b'{"model": 3, "messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": "fake", "messages": []}', "messages"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "n": 1000}', "n"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": "x"}',
     "max_tokens"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
     "stream"),
    (b"[1, 2]", None),
    (b"\xff\xfe\xfa", None),
])
def test_bad_requests_are_400(client: httpx.Client, body: bytes, param: str | None) -> None:
    r = client.post("/v1/chat/completions", content=body,
                    headers={"content-type": "application/json"})
    err = assert_openai_error(r, 400)
    if param:
        assert err["param"] in ("body." + param, param)  # validation: vLLM's form
    assert err["code"] == 400
    still_serving(client)


@pytest.mark.parametrize("extra", [{"temperature": 9}, {"n": 0}, {"top_logprobs": 99},
                                   {"max_tokens": -1}])
def test_ranges_are_the_engines_to_judge(client: httpx.Client, fake_upstream: FakeUpstream,
                                         extra: dict[str, object]) -> None:
    """Out-of-range values reach the engine, whose answer (vLLM: its own 400) is the client's."""
    fake_upstream.mode("error400")
    try:
        r = client.post("/v1/chat/completions", json={**CHAT, **extra})
        direct = httpx.post(fake_upstream.url + "/v1/chat/completions", json={**CHAT, **extra})
        assert (r.status_code, r.json()) == (direct.status_code, direct.json())
    finally:
        fake_upstream.mode("ok")


def test_completions_validation(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "x", "logprobs": "5"})
    assert assert_openai_error(r, 400)["param"] == "body.logprobs"
    r = client.post("/v1/completions", json={"model": "fake"})
    assert assert_openai_error(r, 400)["param"] == "body.prompt"


def test_unknown_model_404_and_unknown_path(client: httpx.Client) -> None:
    err = assert_openai_error(client.post("/v1/chat/completions", json={**CHAT, "model": "x"}),
                              404)
    assert err["code"] == 404 and err["type"] == "NotFoundError"
    assert err["message"] == "The model `x` does not exist. Valid aliases: fake."
    assert_openai_error(client.get("/v1/models/x"), 404)


def test_unknown_path_is_the_engines_answer(client: httpx.Client,
                                            fake_upstream: FakeUpstream) -> None:
    """A path calibserve has no route for is passed through: the engine's status and body."""
    for method, path in (("GET", "/v1/nope"), ("DELETE", "/v1/models"), ("GET", "/nope?x=1")):
        direct = httpx.request(method, fake_upstream.url + path, timeout=10)
        through = client.request(method, path)
        assert (through.status_code, through.content) == (direct.status_code, direct.content)


def test_oversized_body_413(client: httpx.Client) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "a" * 100_000}]}
    assert_openai_error(client.post("/v1/chat/completions", json=big), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "fake", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"a" * 1024
        yield b'"}]}'

    r = client.post("/v1/chat/completions", content=chunks(),
                    headers={"content-type": "application/json"})
    assert_openai_error(r, 413)
    still_serving(client)


@pytest.mark.parametrize("mode, status", [("garbage", 502), ("drop", 502), ("hang", 504)])
def test_upstream_faults_map_to_5xx(
    client: httpx.Client, fake_upstream: FakeUpstream, mode: str, status: int
) -> None:
    fake_upstream.mode(mode)
    started = time.monotonic()
    r = client.post("/v1/chat/completions", json=CHAT)
    elapsed = time.monotonic() - started
    err = assert_openai_error(r, status)
    assert err["code"] == status
    assert "x-calibserve-error-source" not in r.headers  # calibserve's own
    assert elapsed < 5, "never hang: the upstream timeout is 1 s"
    fake_upstream.mode("ok")
    still_serving(client)


@pytest.mark.parametrize("mode", ["error500", "error503"])
@pytest.mark.parametrize("path, extra", [("/v1/chat/completions", {}),
                                         ("/v1/chat/completions", {"stream": True}),
                                         ("/v1/completions", {"prompt": "q"})])
def test_engine_5xx_answer_passes_through(
    client: httpx.Client, fake_upstream: FakeUpstream, mode: str, path: str,
    extra: dict[str, object]
) -> None:
    """An error the engine answered (here a 500 or a 503 after retries) reaches the client with
    the engine's status and body; only failures with no answer get calibserve's own 5xx."""
    body = {**CHAT, **extra}
    if "prompt" in extra:
        body.pop("messages")
    fake_upstream.mode(mode)
    through = client.post(path, json=body)
    direct = httpx.post(fake_upstream.url + path, json=body, timeout=10)
    assert direct.status_code >= 500
    assert (through.status_code, through.json()) == (direct.status_code, direct.json())
    assert through.json()["error"]["type"] == "FakeError"  # the engine's, not calibserve's
    assert through.headers["x-calibserve-error-source"] == "engine"
    fake_upstream.mode("ok")
    still_serving(client)


def test_upstream_4xx_passes_through(client: httpx.Client, fake_upstream: FakeUpstream) -> None:
    fake_upstream.mode("error400")
    err = assert_openai_error(client.post("/v1/chat/completions", json=CHAT), 400)
    assert "injected bad request" in str(err["message"])


def test_stream_dropped_midway_ends_with_error_event(
    client: httpx.Client, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.mode("drop_mid_stream")
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "error" in json.loads(events[-2])
    fake_upstream.mode("ok")
    still_serving(client)


def test_stream_that_cannot_start_gets_http_status(
    client: httpx.Client, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.mode("drop")
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert_openai_error(r, 502)


def test_client_disconnect_ends_request(
    client: httpx.Client, proxy: RunningServer, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.mode("slow", delay_ms=800)
    before = total(client.get("/metrics").text, "calibserve_requests_total",
                   outcome="client_error")
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/chat/completions", json=CHAT, timeout=0.2)
    time.sleep(0.3)
    after = total(client.get("/metrics").text, "calibserve_requests_total",
                  outcome="client_error")
    assert after == before + 1  # noticed and cancelled before the upstream answered


def test_upstream_errors_are_counted(client: httpx.Client, fake_upstream: FakeUpstream) -> None:
    fake_upstream.mode("error500")
    client.post("/v1/chat/completions", json=CHAT)
    text = client.get("/metrics").text
    assert total(text, "calibserve_upstream_errors_total", kind="status") >= 1
    assert total(text, "calibserve_requests_total", outcome="upstream_error") >= 1


def test_unreachable_upstream_is_503_fast(serve_settings: object) -> None:
    settings = ServerSettings.model_validate({
        "signing_key": "k",
        "models": [{"name": "dead", "upstreams": ["http://127.0.0.1:9"],
                    "upstream_model": "dead"}],
    })
    with serve(settings) as running:
        started = time.monotonic()
        r = httpx.post(f"{running.url}/v1/chat/completions", json={**CHAT, "model": "dead"},
                       timeout=10)
        assert_openai_error(r, 503)
        assert time.monotonic() - started < 3
        ready = httpx.get(f"{running.url}/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["ready"] is False


def test_api_keys_and_feedback_key(fake_upstream: FakeUpstream) -> None:
    settings = ServerSettings.model_validate({
        "signing_key": "k", "api_keys": ["sk-a", "sk-b"], "feedback_keys": ["fb"],
        "models": [{"name": "fake", "upstreams": [fake_upstream.url],
                    "upstream_model": "fake-model"}],
    })
    with serve(settings) as running, httpx.Client(base_url=running.url, timeout=10) as c:
        err = assert_openai_error(c.post("/v1/chat/completions", json=CHAT), 401)
        assert err["code"] == 401 and err["type"] == "AuthenticationError"
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        ok = c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-b"})
        assert ok.status_code == 200
        fb = {"id": ok.json()["id"], "correct": True}
        assert_openai_error(c.post("/v1/feedback", json=fb,
                                   headers={"Authorization": "Bearer sk-b"}), 401)
        r = c.post("/v1/feedback", json=fb, headers={"Authorization": "Bearer fb"})
        assert r.status_code == 200, r.text
        assert c.get("/metrics").status_code == 200  # scrapes need no key
        assert c.get("/health").status_code == 200


def test_feedback_http_statuses(client: httpx.Client) -> None:
    answer = client.post("/v1/chat/completions", json=CHAT).json()
    rid = answer["id"]
    assert rid.startswith("chatcmpl-")
    r = client.post("/v1/feedback", json={"id": rid, "correct": True})
    assert r.status_code == 200 and r.json()["confidence"] == answer["choices"][0][
        "confidence"]["score"]
    assert assert_openai_error(client.post("/v1/feedback", json={"id": rid, "correct": True}),
                               409)["code"] == 409
    forged = rid[:-4] + ("AAAA" if not rid.endswith("AAAA") else "BBBB")
    assert_openai_error(client.post("/v1/feedback", json={"id": forged, "correct": True}), 404)
    assert_openai_error(client.post("/v1/feedback", json={"id": "chatcmpl-x", "correct": True}),
                        400)
    assert_openai_error(client.post("/v1/feedback", json={"id": rid}), 400)
    assert_openai_error(client.post("/v1/feedback", json={"id": rid, "correct": "yes"}), 400)
    assert_openai_error(client.post("/v1/feedback", content=b"{"), 400)


def test_openapi_documents_confidence_and_feedback(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "confidence" in schemas["ChatChoice"]["properties"]
    assert "calibserve" in schemas["ChatCompletionResponse"]["properties"]
    assert {"400", "404", "409"} <= set(doc["paths"]["/v1/feedback"]["post"]["responses"])
    assert "404" in doc["paths"]["/v1/feedback"]["post"]["description"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert "422" not in responses  # invalid bodies get 400 in OpenAI's shape
    assert "HTTPValidationError" not in schemas
    n = schemas["ChatCompletionRequest"]["properties"]["n"]["anyOf"][0]
    assert n["maximum"] == 16  # the server's max_n


def test_replicas_round_robin_and_fail_over(fake_upstream: FakeUpstream) -> None:
    fake_upstream.mode("ok")
    settings = ServerSettings.model_validate({
        "signing_key": "k",
        "models": [{"name": "fake", "upstreams": f"http://127.0.0.1:9,{fake_upstream.url}",
                    "upstream_model": "fake-model"}],
    })
    before = httpx.get(f"{fake_upstream.url}/fake/stats").json()["requests"]
    with serve(settings) as running:
        for _ in range(4):  # half of these start on the dead replica and move on
            r = httpx.post(f"{running.url}/v1/chat/completions", json=CHAT, timeout=10)
            assert r.status_code == 200, r.text
    after = httpx.get(f"{fake_upstream.url}/fake/stats").json()["requests"]
    assert after - before >= 4


def test_responses_and_pass_through_fail_over_between_replicas(
    fake_upstream: FakeUpstream
) -> None:
    """The Responses API and the pass-through routes go through the tier's one upstream
    client: a dead replica is skipped as it is for chat (before the one client, they went to
    the first replica only and answered 503 half the time)."""
    fake_upstream.mode("ok")
    settings = ServerSettings.model_validate({
        "signing_key": "k",
        "models": [{"name": "fake", "upstreams": f"http://127.0.0.1:9,{fake_upstream.url}",
                    "upstream_model": "fake-model"}],
    })
    with serve(settings) as running:
        for _ in range(4):  # half of these start on the dead replica and move on
            r = httpx.post(f"{running.url}/v1/responses",
                           json={"model": "fake", "input": "question : ?"}, timeout=10)
            assert r.status_code == 200, r.text
            assert "confidence" in r.json()
            r = httpx.post(f"{running.url}/tokenize", json={"model": "fake", "prompt": "hi"},
                           timeout=10)
            assert r.status_code == 200, r.text
            assert "tokens" in r.json()


def test_each_request_counted_once_under_its_outcome(
    client: httpx.Client, fake_upstream: FakeUpstream
) -> None:
    def counts() -> dict[tuple[str, str], float]:
        text = client.get("/metrics").text
        return {(m, o): total(text, "calibserve_requests_total", model=m, outcome=o)
                for m in ("", "fake")
                for o in ("ok", "client_error", "upstream_error", "server_error")}

    before = counts()
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status_code == 200 and "[DONE]" in r.read().decode()
    assert client.post("/v1/chat/completions", content=b"{not json").status_code == 400
    assert client.post("/v1/completions", json={"model": "nope", "prompt": "q"}).status_code == 404
    # Not a request calibserve serves: the engine's answer, not counted.
    assert client.get("/v1/chat/completions").status_code == httpx.get(
        fake_upstream.url + "/v1/chat/completions").status_code
    assert client.post("/v1/chat/completions", content=b"x" * (65 * 1024),
                       headers={"content-type": "application/json"}).status_code == 413
    fake_upstream.mode("error400")
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 400
    fake_upstream.mode("error500")
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 500
    assert client.post("/v1/chat/completions", json={**CHAT, "stream": True}).status_code == 500
    after = counts()
    delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert delta == {("fake", "ok"): 2, ("", "client_error"): 2, ("fake", "client_error"): 1,
                     ("fake", "upstream_error"): 2}


def test_primary_engine_5xx_falls_back_to_another_tier(fake_upstream: FakeUpstream) -> None:
    """A primary engine's 5xx is the engine failing, not the request: the next tier answers
    (reason `primary_failed`); when none can, the client gets the primary engine's answer."""
    expert = FakeUpstream()
    settings = ServerSettings.model_validate({
        "signing_key": "k",
        "models": [{"name": "fake", "upstreams": [fake_upstream.url],
                    "upstream_model": "fake-model", "policy": "threshold", "threshold": 0.0,
                    "escalate_to": [{"name": "expert", "upstreams": [expert.url],
                                     "upstream_model": "fake-model"}]}],
    })
    try:
        with serve(settings) as running, httpx.Client(base_url=running.url, timeout=10) as c:
            fake_upstream.mode("error500")
            for extra in ({}, {"stream": True}):
                r = c.post("/v1/chat/completions", json={**CHAT, **extra})
                assert r.status_code == 200, r.text
                assert r.headers["x-calibserve-served-by"] == "expert"
                assert r.headers["x-calibserve-escalated"] == "true"
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert json.loads(events[-2])["calibserve"]["reason"] == "primary_failed"
            expert.mode("error503")
            r = c.post("/v1/chat/completions", json=CHAT)
            direct = httpx.post(fake_upstream.url + "/v1/chat/completions", json=CHAT)
            assert (r.status_code, r.json()) == (500, direct.json())
    finally:
        fake_upstream.mode("ok")
        expert.stop()


def test_models_are_the_engines_cards(client: httpx.Client, fake_upstream: FakeUpstream) -> None:
    """/v1/models lists the primary engine's own card under the served name; an engine that
    cannot say leaves the model listed with calibserve's minimal card."""
    engine = httpx.get(fake_upstream.url + "/v1/models", timeout=10).json()["data"][0]
    listing = client.get("/v1/models").json()
    assert listing == {"object": "list", "data": [{**engine, "id": "fake"}]}
    assert client.get("/v1/models/fake").json() == listing["data"][0]
    fake_upstream.mode("error500")
    down = client.get("/v1/models")
    assert down.status_code == 200
    assert [(c["id"], c["owned_by"]) for c in down.json()["data"]] == [("fake", "calibserve")]
    assert client.get("/v1/models/fake").json()["owned_by"] == "calibserve"


def test_models_lists_every_served_model_not_its_tiers(fake_upstream: FakeUpstream) -> None:
    """Two served models (here over one engine) are two cards; an escalation tier is none."""
    fake_upstream.mode("ok")
    tier = {"upstreams": [fake_upstream.url], "upstream_model": "fake-model"}
    settings = ServerSettings.model_validate({"signing_key": "k", "models": [
        {"name": "small", **tier, "escalate_to": [{"name": "big", **tier}], "threshold": 0.5},
        {"name": "other", **tier}]})
    with serve(settings) as running:
        cards = httpx.get(running.url + "/v1/models", timeout=10).json()["data"]
    assert [(c["id"], c["owned_by"]) for c in cards] == [("small", "fake"), ("other", "fake")]

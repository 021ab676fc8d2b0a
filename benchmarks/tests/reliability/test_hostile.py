"""Hostile clients (a fast subset): oversized bodies, disconnects, invalid text, idle hordes."""

from __future__ import annotations

import json

import httpx
import pytest

from benchmarks.reliability.hostile import (
    attack_disconnects,
    attack_idle,
    attack_model_paths,
    raw_exchange,
    request_bytes,
)
from calibserve.testing.checks import chat_body, is_openai_error
from calibserve.testing.fake_upstream import FAKE_MODEL, FakeUpstream
from calibserve.testing.servers import InProcessServer


def _serving(url: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=10)
    assert r.status_code == 200 and "confidence" in r.json()["choices"][0]


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_body_413_and_never_forwarded(rel_server: InProcessServer, fake: FakeUpstream,
                                                chunked: bool) -> None:
    limit = rel_server.runtime.settings.max_body_bytes
    big = json.dumps({**chat_body(), "messages": [{"role": "user", "content": "x" * limit}]})
    status, buf = raw_exchange(rel_server.url, request_bytes(big.encode(), chunked=chunked))
    assert status == 413
    assert is_openai_error(json.loads(buf.partition(b"\r\n\r\n")[2]))
    assert fake.stats()["largest_body"] < limit
    _serving(rel_server.url)


@pytest.mark.parametrize("raw", [
    b'{"model": "fake-model", "messages": [{"role": "user", "content": "\xff\xfe\xc3\x28"}]}',
    b'{"model": "fake-model", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b"null",
])
def test_invalid_bodies_400(rel_server: InProcessServer, raw: bytes) -> None:
    status, buf = raw_exchange(rel_server.url, request_bytes(raw))
    assert status == 400
    assert is_openai_error(json.loads(buf.partition(b"\r\n\r\n")[2]))
    _serving(rel_server.url)


def test_lone_surrogate_is_not_a_500(rel_server: InProcessServer) -> None:
    r = httpx.post(f"{rel_server.url}/v1/chat/completions", timeout=10,
                   content=b'{"model": "fake-model", "messages": [{"role": "user", '
                           b'"content": "\\ud800"}]}', headers={"content-type": "application/json"})
    assert r.status_code in (200, 400), r.text


@pytest.mark.parametrize("stream", [False, True])
def test_nan_in_passthrough_field_is_400(rel_server: InProcessServer, stream: bool) -> None:
    body = json.dumps({**chat_body(stream=stream), "top_k": 1}).replace('"top_k": 1',
                                                                        '"top_k": NaN')
    r = httpx.post(f"{rel_server.url}/v1/chat/completions", content=body.encode(), timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("huge", [{"n": 10**9}, {"n": 17}, {"top_logprobs": 10**6,
                                                           "logprobs": True}])
def test_huge_asks_400(rel_server: InProcessServer, huge: dict[str, object]) -> None:
    r = httpx.post(f"{rel_server.url}/v1/chat/completions", json={**chat_body(), **huge},
                   timeout=10)
    assert r.status_code == 400 and is_openai_error(r.json())


def test_hostile_model_paths_are_clean(rel_server: InProcessServer) -> None:
    verdicts = attack_model_paths(rel_server.url)
    assert all(v.ok for v in verdicts), [v for v in verdicts if not v.ok]


def test_client_disconnect_cancels_upstream(rel_server: InProcessServer,
                                            fake: FakeUpstream) -> None:
    verdicts = attack_disconnects(rel_server.url, fake, rounds=2)
    for v in verdicts:
        assert v.clean, v
        assert v.probes_failed == 0, v
        assert v.extra.get("cancel_after_ms_max", 1e9) < 2000, v


def test_idle_connections_do_not_stop_service(rel_server: InProcessServer) -> None:
    v = attack_idle(rel_server.url, 300, 2.0, b"", "300 idle", None)
    assert v.extra["opened"] >= 300
    assert v.probes_ok > 0 and v.probes_failed == 0, v
    assert FAKE_MODEL in httpx.get(f"{rel_server.url}/v1/models", timeout=10).text

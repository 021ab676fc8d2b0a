"""`UpstreamClient.open`, the relay the pass-through routes and the Responses API use: the same
retry loop, breaker and replica choice as `request_json`, the engine's answer left unread."""

from __future__ import annotations

import httpx
import pytest

from calibserve.routing import (
    CircuitBreaker,
    CircuitState,
    ReplicaPool,
    RetryPolicy,
    Upstream,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from calibserve.routing.errors import CircuitOpen
from calibserve.testing.scripted import ScriptedUpstream, status

pytestmark = pytest.mark.anyio
FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02)
TOKENIZE = httpx.Response(200, json={"tokens": [1, 2, 3]})


async def test_open_relays_to_the_server_root_with_the_clients_headers() -> None:
    fake = ScriptedUpstream([TOKENIZE])
    up = Upstream("relay", "http://fake:8000/v1", api_key="sk", retry=FAST,
                  transport=fake.transport())
    answer = await up.open("POST", "/tokenize?x=1", b'{"prompt":"hi"}',
                           {"content-type": "application/json", "x-mine": "1"})
    assert answer.status_code == 200 and await answer.aread() == TOKENIZE.content
    (sent,) = fake.requests
    assert str(sent.url) == "http://fake:8000/tokenize?x=1"  # under the server root, not /v1
    assert sent.headers["x-mine"] == "1" and sent.headers["authorization"] == "Bearer sk"
    await up.aclose()


async def test_open_retries_an_unavailable_engine_then_relays() -> None:
    fake = ScriptedUpstream(["refuse", status(503), TOKENIZE])
    up = Upstream("relay-retry", "http://fake", retry=FAST, transport=fake.transport())
    answer = await up.open("POST", "/tokenize", b"{}", {})
    assert answer.status_code == 200 and len(fake.requests) == 3
    await answer.aclose()
    await up.aclose()


async def test_open_gives_back_the_engines_own_error_unread() -> None:
    fake = ScriptedUpstream([status(400), status(500)])
    up = Upstream("relay-errors", "http://fake", retry=FAST, transport=fake.transport())
    answer = await up.open("POST", "/tokenize", b"{}", {})
    assert answer.status_code == 400 and len(fake.requests) == 1
    assert (await answer.aread()) == status(400).content
    answer = await up.open("POST", "/tokenize", b"{}", {})
    assert answer.status_code == 500 and len(fake.requests) == 2  # a 500 is not retried
    await answer.aclose()
    # 503s are retried; the last one, retries spent, goes back as the engine sent it.
    fake = ScriptedUpstream([status(503)])
    up = Upstream("relay-503", "http://fake", retry=FAST, transport=fake.transport())
    answer = await up.open("GET", "/version", b"", {})
    assert answer.status_code == 503 and len(fake.requests) == 3
    await answer.aclose()
    await up.aclose()


async def test_open_feeds_the_breaker_and_fails_fast_when_it_is_open() -> None:
    fake = ScriptedUpstream([status(500)])
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=60)
    up = Upstream("relay-breaker", "http://fake", retry=FAST, breaker=breaker,
                  transport=fake.transport())
    for _ in range(2):
        await (await up.open("POST", "/tokenize", b"{}", {})).aclose()
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpen):
        await up.open("POST", "/tokenize", b"{}", {})
    assert len(fake.requests) == 2
    await up.aclose()


async def test_open_that_gets_no_answer_is_a_timeout() -> None:
    fake = ScriptedUpstream(["hang"])
    up = Upstream("relay-hang", "http://fake", timeout=0.2, retry=FAST,
                  transport=fake.transport())
    with pytest.raises(UpstreamTimeout):
        await up.open("POST", "/v1/responses", b"{}", {})
    assert len(fake.requests) == 1  # a timeout may have reached the engine: not retried
    await up.aclose()


async def test_replica_pool_opens_on_the_next_replica_when_one_is_down() -> None:
    dead = ScriptedUpstream(["refuse"])
    alive = ScriptedUpstream([TOKENIZE])
    one = RetryPolicy(max_attempts=1)
    pool = ReplicaPool("pool", [
        Upstream("pool#0", "http://dead", retry=one, transport=dead.transport()),
        Upstream("pool#1", "http://alive", retry=one, transport=alive.transport())])
    for _ in range(2):  # whichever replica the round robin starts on
        answer = await pool.open("POST", "/tokenize", b"{}", {})
        assert answer.status_code == 200
        await answer.aclose()
    assert len(alive.requests) == 2 and len(dead.requests) >= 1
    pool_dead = ReplicaPool("pool-dead", [
        Upstream("pd#0", "http://dead", retry=one, transport=dead.transport())])
    with pytest.raises(UpstreamUnavailable):
        await pool_dead.open("POST", "/tokenize", b"{}", {})
    await pool.aclose()

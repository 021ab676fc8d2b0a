"""Upstream resilience against scripted FAKE faulty upstreams and a dead local port."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from prometheus_client import REGISTRY

from calibserve.routing import (
    CircuitBreaker,
    CircuitState,
    RetryPolicy,
    Upstream,
    UpstreamBadResponse,
    UpstreamClientError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from calibserve.routing.errors import CircuitOpen
from calibserve.testing.scripted import ScriptedUpstream, SlowStream, fake_chat_events, ok, status

pytestmark = pytest.mark.anyio
FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again on exit: nothing listens there


def retries(name: str) -> float:
    return REGISTRY.get_sample_value("calibserve_upstream_retries_total", {"upstream": name}) or 0


async def test_429_with_retry_after_is_retried_after_the_wait() -> None:
    fake = ScriptedUpstream([status(429, retry_after="0.3"), ok()])
    up = Upstream("fake-429", "http://fake", retry=FAST, transport=fake.transport())
    started = time.perf_counter()
    body = await up.request_json("/v1/chat/completions", {"model": "m"})
    assert body["choices"][0]["message"]["content"] == "B"
    assert time.perf_counter() - started >= 0.3
    assert len(fake.requests) == 2 and retries("fake-429") == 1
    assert up.breaker.state is CircuitState.CLOSED  # 429 is not a breaker failure
    await up.aclose()


async def test_429_with_long_retry_after_goes_back_to_the_client() -> None:
    fake = ScriptedUpstream([status(429, retry_after="120")])
    up = Upstream("fake-429-long", "http://fake", retry=FAST, transport=fake.transport())
    with pytest.raises(UpstreamClientError) as info:
        await up.request_json("chat/completions", {"model": "m"})
    assert info.value.status_code == 429 and info.value.retry_after == 120
    assert info.value.body == {"error": {"message": "fake 429"}}
    assert len(fake.requests) == 1


async def test_503s_exhaust_retries_then_unavailable() -> None:
    fake = ScriptedUpstream([status(503)])
    up = Upstream("fake-503", "http://fake", retry=FAST, transport=fake.transport())
    with pytest.raises(UpstreamUnavailable) as info:
        await up.request_json("chat/completions", {"model": "m"})
    assert info.value.status_code == 503 and "HTTP 503" in str(info.value)
    assert info.value.answered == 503 and info.value.body == {"error": {"message": "fake 503"}}
    assert len(fake.requests) == 3


async def test_500_is_not_retried_and_carries_the_engines_answer() -> None:
    fake = ScriptedUpstream([status(500)])
    up = Upstream("fake-500", "http://fake", retry=FAST, transport=fake.transport())
    with pytest.raises(UpstreamBadResponse) as info:
        await up.request_json("chat/completions", {"model": "m"})
    assert info.value.status_code == 502 and len(fake.requests) == 1
    # The server passes the engine's own answer through (status and body).
    assert info.value.answered == 500 and info.value.body == {"error": {"message": "fake 500"}}


async def test_400_passes_through_untouched() -> None:
    fake = ScriptedUpstream([status(400)])
    up = Upstream("fake-400", "http://fake", retry=FAST, transport=fake.transport())
    with pytest.raises(UpstreamClientError) as info:
        await up.request_json("chat/completions", {"model": "m"})
    assert info.value.status_code == 400 and len(fake.requests) == 1


async def test_hang_times_out() -> None:
    up = Upstream("fake-hang", "http://fake", timeout=0.3, retry=FAST,
                  transport=ScriptedUpstream(["hang"]).transport())
    started = time.perf_counter()
    with pytest.raises(UpstreamTimeout) as info:
        await up.request_json("chat/completions", {"model": "m"})
    assert info.value.status_code == 504 and time.perf_counter() - started < 2
    assert info.value.answered is None  # no answer: calibserve's own 504


async def test_dead_port_is_unavailable_after_retries() -> None:
    up = Upstream("dead", f"http://127.0.0.1:{dead_port()}", retry=FAST)
    with pytest.raises(UpstreamUnavailable) as info:
        await up.request_json("chat/completions", {"model": "m"})
    assert info.value.kind == "connect" and retries("dead") == 2
    assert info.value.answered is None and info.value.body is None
    await up.aclose()


async def test_breaker_opens_fails_fast_then_probe_closes_it() -> None:
    fake = ScriptedUpstream(["refuse", "refuse", "refuse", ok()])
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=0.2)
    up = Upstream("fake-breaker", "http://fake", retry=RetryPolicy(max_attempts=1),
                  breaker=breaker, transport=fake.transport())
    for _ in range(3):
        with pytest.raises(UpstreamUnavailable):
            await up.request_json("chat/completions", {"model": "m"})
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpen):
        await up.request_json("chat/completions", {"model": "m"})
    assert len(fake.requests) == 3  # failed fast: the upstream was not called
    await asyncio.sleep(0.25)
    assert (await up.request_json("chat/completions", {"model": "m"}))["choices"]
    assert breaker.state is CircuitState.CLOSED
    assert REGISTRY.get_sample_value(
        "calibserve_circuit_state", {"upstream": "fake-breaker"}
    ) == 0


async def test_stream_parses_events_and_retries_before_first_event() -> None:
    events = fake_chat_events([("B", 0.9)])
    fake = ScriptedUpstream([status(503, retry_after="0"),
                         lambda r: __import__("httpx").Response(200, stream=SlowStream(events))])
    up = Upstream("fake-stream", "http://fake", retry=FAST, transport=fake.transport())
    chunks = [c async for c in up.stream("chat/completions", {"model": "m", "stream": True})]
    assert len(chunks) == 2 and chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stream_that_stalls_times_out() -> None:
    import httpx

    events = fake_chat_events([("B", 0.9), ("C", 0.9)])
    fake = ScriptedUpstream([
        lambda r: httpx.Response(200, stream=SlowStream(events, hang_after=1))])
    up = Upstream("fake-stall", "http://fake", timeout=0.3, transport=fake.transport())
    got = []
    with pytest.raises(UpstreamTimeout, match="stopped streaming"):
        async for c in up.stream("chat/completions", {"model": "m"}):
            got.append(c)
    assert len(got) == 1


def test_a_compressed_4xx_from_an_https_upstream_passes_through_decoded() -> None:
    import gzip

    import httpx

    from calibserve.routing import Upstream, UpstreamClientError

    body = gzip.compress(b'{"error": {"message": "no such model"}}')

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, content=body, headers={
            "content-encoding": "gzip", "content-type": "application/json"})

    async def main() -> UpstreamClientError:
        up = Upstream("u", "https://api.example/v1", transport=httpx.MockTransport(handler))
        try:
            await up.request_json("chat/completions", {"model": "m"})
        except UpstreamClientError as exc:
            return exc
        finally:
            await up.aclose()
        raise AssertionError("no error")

    exc = asyncio.run(main())
    assert exc.status_code == 404 and exc.body == {"error": {"message": "no such model"}}

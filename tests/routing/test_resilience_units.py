"""Retry back-off and Retry-After, the circuit breaker's state machine, SSE parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from calibserve.routing import CircuitBreaker, CircuitState, RetryPolicy, parse_retry_after
from calibserve.routing.identity import api_root, choose_model, model_ids, server_root
from calibserve.routing.sse import iter_sse_data
from calibserve.routing.upstream import relative_path


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    top = RetryPolicy(max_attempts=10, base_delay=0.1, max_delay=1.0, rng=lambda: 1.0)
    assert [top.delay(a) for a in (1, 2, 3)] == pytest.approx([0.1, 0.2, 0.4])
    assert top.delay(8) == pytest.approx(1.0)
    assert RetryPolicy(max_attempts=10, rng=lambda: 0.0).delay(3) == 0.0
    assert top.delay(10) is None  # attempts used up


def test_retry_after_is_a_floor_and_too_long_is_not_waited() -> None:
    p = RetryPolicy(max_attempts=3, base_delay=0.1, max_retry_after=5, rng=lambda: 0.5)
    assert p.delay(1, retry_after=2.0) == pytest.approx(2.05)
    assert p.delay(1, retry_after=30.0) is None


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = datetime(2026, 1, 1, tzinfo=UTC)
    date = (now + timedelta(seconds=7)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(date, now=now) == pytest.approx(7.0)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def state_gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("calibserve_circuit_state", {"upstream": name})


def test_breaker_opens_half_opens_and_closes() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, reset_timeout=10, name="unit-breaker", clock=clock)
    opens = REGISTRY.get_sample_value(
        "calibserve_circuit_opens_total", {"upstream": "unit-breaker"}
    )
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    b.record_success()  # resets the consecutive count
    for _ in range(3):
        assert b.allow()
        b.record_failure()
    assert b.state is CircuitState.OPEN and not b.allow()
    assert state_gauge("unit-breaker") == 2
    assert REGISTRY.get_sample_value(
        "calibserve_circuit_opens_total", {"upstream": "unit-breaker"}
    ) == (opens or 0) + 1
    clock.t = 10.0
    assert b.state is CircuitState.HALF_OPEN and state_gauge("unit-breaker") == 1
    assert b.allow() and not b.allow()  # exactly one probe
    b.record_failure()
    assert b.state is CircuitState.OPEN  # failed probe re-opens, cool-down restarts
    clock.t = 15.0
    assert not b.allow()
    clock.t = 20.0
    assert b.allow()
    b.record_success()
    assert b.state is CircuitState.CLOSED and state_gauge("unit-breaker") == 0


def test_breaker_release_frees_the_probe() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, reset_timeout=1, clock=clock)
    b.record_failure()
    clock.t = 1
    assert b.allow()
    b.release()
    assert b.allow()


def test_api_root_and_paths() -> None:
    assert api_root("http://h:1") == "http://h:1/v1"
    assert api_root("https://api.x.com/v1/") == "https://api.x.com/v1"
    assert api_root("https://x.com/openai/v2") == "https://x.com/openai/v2"
    assert server_root("http://h:1/v1/") == server_root("http://h:1") == "http://h:1"
    assert server_root("https://x.com/openai/v2") == "https://x.com/openai"
    assert relative_path("/v1/chat/completions") == relative_path("chat/completions")


def test_model_discovery_rules() -> None:
    listing = {"data": [{"id": "a"}, {"id": "b"}, {"object": "model"}, "junk"]}
    assert model_ids(listing) == ["a", "b"] and model_ids({"data": {}}) == []
    assert choose_model(["a", "b"], "b") == "b"
    assert choose_model(["a"], "x") == "a" and choose_model(["a"]) == "a"
    assert choose_model(["a", "b"], "x") is None and choose_model([]) is None


@pytest.mark.anyio
async def test_sse_parsing_multiline_comments_and_trailing_event() -> None:
    async def lines():
        for line in [": keep-alive", "data: {\"a\":", "data: 1}", "", "event: x", "data: [DONE]"]:
            yield line

    assert [d async for d in iter_sse_data(lines())] == ['{"a":\n1}', "[DONE]"]


@pytest.mark.anyio
@pytest.mark.parametrize("split", [1, 3, 7, 64, 10_000])
async def test_sse_bytes_parser_yields_what_the_line_parser_does(split: int) -> None:
    from calibserve.routing.sse import iter_sse_bytes

    text = ('data: {"a": 1}\n\n: keep-alive\n\ndata: {"b":\n data: 2}\r\n\r\n'
            'event: x\nid: 3\ndata: {"c": "\u2028 é"}\n\ndata\n\ndata: [DONE]\n\ndata: tail')
    raw = text.encode()

    from collections.abc import AsyncIterator

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), split):
            yield raw[i:i + split]

    async def lines() -> AsyncIterator[str]:
        for line in text.split("\n"):
            yield line

    expected = [d async for d in iter_sse_data(lines())]
    got = [d.decode() async for d in iter_sse_bytes(chunks())]
    assert got == expected and expected[-2:] == ["[DONE]", "tail"]


@pytest.mark.parametrize("doc", [
    b'{"a": [1, -0.0, 1.5e300, 123456789012345678901234567890], "b": "\\u00e9\xe2\x80\xa8"}',
    b'{"a": 1, "a": 2}', b'{"x": NaN}', b'{"x": 1e400}', b'"\\ud800"', b'\xef\xbb\xbf{}',
])
def test_json_codec_gives_what_the_standard_library_gives(doc: bytes) -> None:
    import json

    from calibserve.routing.jsoncodec import loads

    got, expected = loads(doc), json.loads(doc)
    assert json.dumps(got) == json.dumps(expected)


@pytest.mark.parametrize("doc", [b'{"a": ', b"\xff", b""])
def test_json_codec_raises_the_standard_library_errors(doc: bytes) -> None:
    import json

    from calibserve.routing.jsoncodec import loads

    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):
        loads(doc)

"""The fidelity comparison itself (no engine): a stream is identical if one of its attempts is,
and a proxy that changes a stream every time still fails."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from tests.server.fidelity import STREAM_ATTEMPTS, Kind, compare, resp

KIND = Kind("responses stream", "/v1/responses", resp(stream=True), stream=True)


def stream(*deltas: list[float]) -> bytes:
    """A Responses stream whose text deltas carry these logprobs (one token each)."""
    events = [("response.created", {"type": "response.created", "response": {"status": "x"}})]
    events += [("response.output_text.delta", {
        "type": "response.output_text.delta", "delta": "a" * len(lps),
        "logprobs": [{"token": "a", "logprob": lp} for lp in lps]}) for lps in deltas]
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n"
                   for name, data in events).encode()


def client(direct: Callable[[int], bytes], proxy: Callable[[int], bytes]) -> httpx.Client:
    calls = {"direct": 0, "proxy": 0}

    def handle(request: httpx.Request) -> httpx.Response:
        side = "direct" if request.url.host == "direct" else "proxy"
        calls[side] += 1
        body = (direct if side == "direct" else proxy)(calls[side])
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    return httpx.Client(transport=httpx.MockTransport(handle))


def test_differently_cut_chunks_of_the_same_tokens_are_identical() -> None:
    with client(lambda n: stream([-0.1], [-0.2]), lambda n: stream([-0.1, -0.2])) as c:
        assert compare(c, KIND, "http://direct", "http://proxy") == []


def test_a_coalesced_delta_that_lost_a_logprob_passes_on_a_later_attempt() -> None:
    def proxy(n: int) -> bytes:  # the first answer lost a token's logprob, the next did not
        return stream([-0.1]) if n == 1 else stream([-0.1], [-0.2])

    with client(lambda n: stream([-0.1], [-0.2]), proxy) as c:
        assert compare(c, KIND, "http://direct", "http://proxy") == []


def test_a_stream_changed_every_time_still_differs() -> None:
    answered: list[int] = []

    def proxy(n: int) -> bytes:
        answered.append(n)
        return stream([-0.1], [-0.9])

    with client(lambda n: stream([-0.1], [-0.2]), proxy) as c:
        found = compare(c, KIND, "http://direct", "http://proxy")
    assert found and "logprob" in found[0]
    assert answered == list(range(1, STREAM_ATTEMPTS + 1))


def test_a_body_is_compared_once() -> None:
    kind = Kind("responses", "/v1/responses", resp())
    sent: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.host)
        return httpx.Response(200, json={"output": request.url.host})

    with httpx.Client(transport=httpx.MockTransport(handle)) as c:
        assert compare(c, kind, "http://direct", "http://proxy")
    assert sent == ["direct", "proxy"]

"""A scripted FAKE upstream in this process (httpx.MockTransport), for unit tests that inject
faults on cue: 429 with Retry-After, 503s, hangs, broken streams, and a healthy canned answer to
contrast them with. (The FAKE upstream as a server is fake_upstream.FakeUpstream.)

Behaviour that matters (confidence, escalation, streaming modes) is tested against real vLLM
servers in test_integration_vllm.py; these fakes exist because a real vLLM cannot be made to fail
on cue.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx


def fake_chat_answer(text: str, prob: float, model: str = "fake") -> dict[str, Any]:
    """A canned chat completion whose single token has probability `prob`."""
    lp = math.log(prob)
    return {
        "id": "fake-1",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": {
                    "content": [
                        {"token": text, "logprob": lp, "bytes": None,
                         "top_logprobs": [{"token": text, "logprob": lp, "bytes": None}]}
                    ]
                },
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def fake_chat_events(tokens: list[tuple[str, float]], model: str = "fake") -> list[bytes]:
    """SSE events of a streamed chat completion, one token per chunk, then [DONE]."""
    events = [{"id": "fake-s", "object": "chat.completion.chunk", "model": model,
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}]}]
    for i, (text, prob) in enumerate(tokens):
        lp = math.log(prob)
        events.append({
            "id": "fake-s", "object": "chat.completion.chunk", "model": model,
            "choices": [{
                "index": 0, "delta": {"content": text},
                "logprobs": {"content": [{"token": text, "logprob": lp, "bytes": None,
                                          "top_logprobs": [{"token": text, "logprob": lp}]}]},
                "finish_reason": "stop" if i == len(tokens) - 1 else None,
            }],
        })
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


class SlowStream(httpx.AsyncByteStream):
    """A response body that sends `parts` then waits `hang` seconds before each further part."""

    def __init__(self, parts: list[bytes], hang_after: int | None = None, hang: float = 60):
        self.parts, self.hang_after, self.hang = parts, hang_after, hang
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i, part in enumerate(self.parts):
            if self.hang_after is not None and i >= self.hang_after:
                await asyncio.sleep(self.hang)
            yield part


Step = httpx.Response | Callable[[httpx.Request], Any] | str


@dataclass
class ScriptedUpstream:
    """A scripted FAKE upstream: each request consumes the next step (the last one repeats).

    A step is an httpx.Response, the string "hang" (never answers), "refuse" (connect error),
    or a callable(request) -> httpx.Response.
    """

    steps: list[Step]
    requests: list[httpx.Request] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.content:
            self.bodies.append(json.loads(request.content))
        step = self.steps[min(len(self.requests) - 1, len(self.steps) - 1)]
        if step == "hang":
            await asyncio.sleep(3600)
        if step == "refuse":
            raise httpx.ConnectError("fake: connection refused", request=request)
        if callable(step):
            answer: httpx.Response = step(request)
            return answer
        assert isinstance(step, httpx.Response)
        # Responses are reused when the last step repeats: hand out copies.
        return httpx.Response(step.status_code, headers=step.headers, content=step.content)


def ok(text: str = "B", prob: float = 0.9) -> httpx.Response:
    return httpx.Response(200, json=fake_chat_answer(text, prob))


def status(code: int, retry_after: str | None = None) -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return httpx.Response(code, headers=headers, json={"error": {"message": f"fake {code}"}})

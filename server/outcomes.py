"""Each chat/completions/responses request's outcome, counted once in `calibserve_requests_total`.

Whoever writes the response says what happened, on the request's `Outcome`: the proxy once the
model is known (`ok`; `client_error` for an upstream 4xx or a client gone away; `upstream_error`),
for a stream when the stream ends, and the error handlers for requests refused before the model
was known (`model=""`, `client_error` below 500). `OutcomeCounter`, a pure ASGI middleware, is the
one place that counts: just before the response's last message goes out (a client that has read
the whole answer finds it counted), else when the request ends. A request that fails before any
response started is a `server_error` with `model=""` (Starlette answers it with a 500 outside this
middleware). Responses nobody gave an outcome (the framework's 405, the body limit's 413) are not
requests to an endpoint and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from calibserve.server.metrics import ServerMetrics

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
             "/v1/responses": "responses"}
_SCOPE_KEY = "calibserve.outcome"


@dataclass
class Outcome:
    """What one request came to: the `model` and `outcome` labels it is counted under."""

    model: str = ""
    outcome: str | None = None

    def record(self, model: str, outcome: str) -> None:
        self.model, self.outcome = model, outcome

    def refused(self, status: int) -> None:
        """Refused before the model was known, with this HTTP status."""
        self.record("", "client_error" if status < 500 else "server_error")


def outcome_of(request: Request) -> Outcome:
    """The request's Outcome; a detached one (counted nowhere) for requests that are not."""
    outcome = request.scope.get(_SCOPE_KEY)
    return outcome if isinstance(outcome, Outcome) else Outcome()


class OutcomeCounter:
    """Counts the recorded Outcome of every request to ENDPOINTS, exactly once."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        outcome = Outcome()
        scope[_SCOPE_KEY] = outcome
        started = counted = False

        def count() -> None:
            nonlocal counted
            if not counted and outcome.outcome is not None:
                counted = True
                self.metrics.requests.labels(outcome.model, endpoint, outcome.outcome).inc()

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                count()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                outcome.record("", "server_error")
            raise
        finally:
            count()

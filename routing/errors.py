"""The one exception hierarchy of routing/: what can go wrong talking to an upstream.

Each class carries the HTTP status the server should answer with and a `kind` label
(`connect|timeout|status|protocol`) matching `calibserve_upstream_errors_total{kind}`, so the
server can map errors to responses and metrics without inspecting messages.

An error the upstream answered itself (an HTTP 4xx or 5xx) also carries that answer: `answered`
(its status) and `body`. The server passes such an answer through to the client as the engine
sent it; only failures with no answer (connect refused, timeout, a broken or non-JSON answer,
circuit open) are answered with `status_code`, calibserve's own 502/503/504.
"""

from __future__ import annotations

from typing import Any


class RoutingError(Exception):
    """Base class of every error raised by routing/."""


class UpstreamError(RoutingError):
    """An upstream call failed. `status_code` is what the proxy should answer with."""

    status_code: int = 502
    kind: str = "status"

    def __init__(
        self,
        message: str,
        *,
        upstream: str = "",
        kind: str | None = None,
        retry_after: float | None = None,
        answered: int | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.upstream = upstream
        if kind is not None:
            self.kind = kind
        # Seconds the upstream asked us to wait (Retry-After), for the server to pass on.
        self.retry_after = retry_after
        # The upstream's own error answer: its HTTP status (None: it gave none) and its body,
        # parsed JSON when it sent JSON (OpenAI's error shape), else the raw text.
        self.answered = answered
        self.body = body

    def __str__(self) -> str:
        prefix = f"upstream {self.upstream!r}: " if self.upstream else ""
        return f"{prefix}{self.message}"


class UpstreamUnavailable(UpstreamError):
    """Cannot reach the upstream: connect error, circuit open (-> 503), or its 503 answer after
    retries (`answered`: passed through)."""

    status_code = 503
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer (or stopped streaming) within its timeout (-> 504)."""

    status_code = 504
    kind = "timeout"


class UpstreamBadResponse(UpstreamError):
    """The upstream answered 5xx (`answered`: passed through) or something that is not valid
    OpenAI JSON / SSE (-> 502)."""

    status_code = 502
    kind = "status"


class UpstreamClientError(UpstreamError):
    """The upstream rejected the request (4xx): the server passes status and body through."""

    kind = "status"

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: Any = None,
        upstream: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, upstream=upstream, retry_after=retry_after,
                         answered=status_code, body=body)
        self.status_code = status_code


class CircuitOpen(UpstreamUnavailable):
    """The upstream's circuit breaker is open: failed fast without calling it (-> 503)."""

    kind = "connect"

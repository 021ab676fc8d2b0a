"""The one exception hierarchy of routing/: what can go wrong talking to an upstream.

Each class carries the HTTP status the server should answer with and a `kind` label
(`connect|timeout|status|protocol`) matching `calibserve_upstream_errors_total{kind}`, so the
server can map errors to responses and metrics without inspecting messages.
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
    ) -> None:
        super().__init__(message)
        self.message = message
        self.upstream = upstream
        if kind is not None:
            self.kind = kind
        # Seconds the upstream asked us to wait (Retry-After), for the server to pass on.
        self.retry_after = retry_after

    def __str__(self) -> str:
        prefix = f"upstream {self.upstream!r}: " if self.upstream else ""
        return f"{prefix}{self.message}"


class UpstreamUnavailable(UpstreamError):
    """Cannot reach the upstream: connect error, circuit open, or 503 after retries (-> 503)."""

    status_code = 503
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer (or stopped streaming) within its timeout (-> 504)."""

    status_code = 504
    kind = "timeout"


class UpstreamBadResponse(UpstreamError):
    """The upstream answered 5xx or something that is not valid OpenAI JSON / SSE (-> 502)."""

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
        super().__init__(message, upstream=upstream, retry_after=retry_after)
        self.status_code = status_code
        # Parsed JSON when the upstream sent JSON (OpenAI error shape), else the raw text.
        self.body = body


class CircuitOpen(UpstreamUnavailable):
    """The upstream's circuit breaker is open: failed fast without calling it (-> 503)."""

    kind = "connect"

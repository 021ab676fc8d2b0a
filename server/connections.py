"""Deadlines for slow and idle clients, and a cap on open connections, in the HTTP protocol.

A client that opens a connection and sends half a request (slowloris), a body that stops, or
nothing at all, holds a file descriptor and memory for as long as the server lets it; a reader
that never reads a stream holds the request's task and its upstream stream. uvicorn bounds none
of these: `timeout_keep_alive` runs only between requests and any byte resets it, and
`limit_concurrency` answers 503 only once a request's headers have arrived, so it counts the
very connections it should shed (uvicorn issue #157 lists header and body timeouts as not done).
An ASGI middleware cannot help either: the app sees a request only once its headers are parsed.
So the deadlines live here, in a subclass of the protocol `calibserve serve` runs
(`JoinedWritesProtocol`, httptools), each a timer on the event loop:

- header: a new connection's request line and headers must arrive within `header_timeout_s` of
  the connect, a later request's within `header_timeout_s` of its first byte. A request that has
  begun gets 408 and the connection closes; a connection that sent nothing is simply closed.
- body: a request body must keep arriving, at most `body_timeout_s` between two reads (nginx's
  `client_body_timeout`); else 408 if no response has begun (the app's receive() then sees the
  client gone), and the connection closes.
- keep-alive: idle between requests at most `keep_alive_timeout_s` (uvicorn's own timer, armed
  when a response completes), then closed: no 408, since nothing was asked.
- write: a response write may block on a full send buffer at most `write_timeout_s`; then the
  connection is aborted (a close would wait for the reader forever). A slow reader that keeps
  reading resets it every time the buffer drains, so streams to slow readers go on. A close that
  leaves bytes unsent (the transport then waits for them to drain before it lets go) gets the
  same bound.

While the protocol has stopped reading (a pipelined request, a body buffered ahead of the app)
the client cannot be blamed, so a deadline that falls then is pushed back. A request that has
arrived whole carries no deadline of its own: the app's upstream timeouts bound it.

The cap: a connection that would make more than `max_connections` open ones is answered at once
with a 503 (OpenAI's error shape, `retry-after`, `connection: close`), before a byte of its request
is read, and closed after a short linger (so the client reads the 503 rather than a reset). The
open count is the `calibserve_open_connections` gauge; refusals and timeouts are counted too.

A request that arrives in one segment, as nearly all do, starts no timer at all: the deadlines
are armed only when a read leaves headers or a body incomplete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from calibserve.server.errors import error_body
from calibserve.server.http_protocol import JoinedWritesProtocol, _JoinedWrites

if TYPE_CHECKING:
    from calibserve.server.config import ServerSettings
    from calibserve.server.metrics import ServerMetrics

log = logging.getLogger("calibserve.server")

# What `timed_out` counts, as the `kind` label of calibserve_connection_timeouts_total.
TIMEOUT_KINDS = ("header", "body", "keep_alive", "write")
# Descriptors kept free for everything else the process opens (upstream connections, engines'
# pipes, log files) when the cap is derived from the open-file limit.
FD_RESERVE = 256
# The cap when none is configured, where the open-file limit allows it: idle connections cost
# memory as well as descriptors (benchmarks/RESULTS.md, "slow clients").
DEFAULT_MAX_CONNECTIONS = 10_000
# How long a refused connection may stay open for its client to read the 503.
REFUSED_LINGER_S = 1.0
REFUSAL_LOG_EVERY_S = 60.0


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit, as nginx's
    `worker_rlimit_nofile` and Go's runtime do; (before, after). Nothing is raised past 1M."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a sandbox may refuse: keep the soft limit
            return soft, soft
        return soft, target
    return soft, soft


def default_max_connections() -> int:
    """The cap when none is configured: the open-file limit less FD_RESERVE, at most
    DEFAULT_MAX_CONNECTIONS, at least 16."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(16, min(DEFAULT_MAX_CONNECTIONS, soft - FD_RESERVE))


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The deadlines (seconds) and the cap one server's connections share."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 15.0
    write_timeout_s: float = 30.0
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ConnectionLimits:
        cap = settings.max_connections
        return cls(header_timeout_s=settings.header_timeout_s,
                   body_timeout_s=settings.body_timeout_s,
                   keep_alive_timeout_s=settings.keep_alive_timeout_s,
                   write_timeout_s=settings.write_timeout_s,
                   max_connections=cap if cap is not None else default_max_connections())


def _raw_response(status: int, reason: str, message: str, kind: str,
                  extra: str = "") -> bytes:
    body = json.dumps(error_body(message, kind, None, status)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n")
    return head.encode() + body


class ConnectionGuard:
    """One server's limits, its count of open connections, and what its connections report
    (into `metrics` when given: the gauge reads `open` at each scrape)."""

    def __init__(self, limits: ConnectionLimits, metrics: ServerMetrics | None = None) -> None:
        self.limits = limits
        self.open = 0
        self.peak = 0
        self.lingering = 0
        self.refused = 0
        self.write_waits = 0  # times a response write found the send buffer full
        self.timeouts: dict[str, int] = dict.fromkeys(TIMEOUT_KINDS, 0)
        self._metrics = metrics
        self._warned = -REFUSAL_LOG_EVERY_S
        if metrics is not None:
            metrics.open_connections.set_function(lambda: self.open)
        self.header_408 = _raw_response(
            408, "Request Timeout",
            f"request headers not received within {limits.header_timeout_s:g} s",
            "RequestTimeoutError")
        self.body_408 = _raw_response(
            408, "Request Timeout",
            f"request body stalled for {limits.body_timeout_s:g} s", "RequestTimeoutError")
        self.refusal = _raw_response(
            503, "Service Unavailable",
            f"this server holds its limit of {limits.max_connections} open connections; retry "
            "later", "ServiceUnavailableError", "retry-after: 1\r\n")

    def protocol(self) -> type[GuardedProtocol]:
        """The protocol class for `uvicorn.Config(http=...)`, bound to this guard."""
        return type("GuardedProtocol", (GuardedProtocol,), {"guard": self})

    def admit(self) -> bool:
        if self.open >= self.limits.max_connections:
            self.refused += 1
            if self._metrics is not None:
                self._metrics.connections_refused.inc()
            now = time.monotonic()
            if now - self._warned >= REFUSAL_LOG_EVERY_S:  # one line a minute, not one a refusal
                log.warning("%d open connections, the limit (max_connections): new ones get 503 "
                            "(%d so far)", self.open, self.refused)
                self._warned = now
            return False
        self.open += 1
        self.peak = max(self.peak, self.open)
        return True

    def release(self) -> None:
        self.open -= 1

    def timed_out(self, kind: str) -> None:
        self.timeouts[kind] += 1
        if self._metrics is not None:
            self._metrics.connection_timeouts.labels(kind).inc()


class _Refused(asyncio.Protocol):
    """A connection over the cap: the 503 at once, its request never read, closed when the
    client closes or after REFUSED_LINGER_S."""

    def __init__(self, guard: ConnectionGuard, loop: asyncio.AbstractEventLoop) -> None:
        self.guard = guard
        self.loop = loop
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.guard.refusal)
        if self.guard.lingering >= self.guard.limits.max_connections:
            transport.close()  # a flood of refusals: no lingering past the cap's worth of them
            return
        self.guard.lingering += 1
        self.timer = self.loop.call_later(REFUSED_LINGER_S, transport.close)
        if transport.can_write_eof():
            transport.write_eof()

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read: what arrives is discarded until the client closes

    def eof_received(self) -> bool:
        return False  # the client has read the 503 and closed: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.guard.lingering -= 1


class _BoundedWrites(_JoinedWrites):
    """http_protocol's joined writes, and a close that leaves bytes unsent (a reader that stopped
    reading a response which then ended, or a connection closed idle after it) tells the protocol,
    which bounds the wait for them: a transport closes only once its buffer drains."""

    __slots__ = ("_unsent",)

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop,
                 unsent: Callable[[], None]) -> None:
        super().__init__(transport, loop)
        self._unsent = unsent

    def close(self) -> None:
        super().close()
        if self._transport.get_write_buffer_size():
            self._unsent()


class GuardedProtocol(JoinedWritesProtocol):
    """`JoinedWritesProtocol` with the deadlines and the cap of `guard` (a class attribute:
    `ConnectionGuard.protocol()` makes the subclass uvicorn instantiates per connection)."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = self.guard.limits
        # uvicorn's keep-alive timer, armed when a response completes; it types the value int,
        # call_later takes any float.
        self.timeout_keep_alive = limits.keep_alive_timeout_s  # type: ignore[assignment]
        self._reading: str | None = None  # "headers" | "body" | None (between requests)
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_kind = ""
        self._last_read = 0.0
        self._write_timer: asyncio.TimerHandle | None = None
        self._admitted = False

    # -- connection ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if not self.guard.admit():
            refused = _Refused(self.guard, self.loop)
            transport.set_protocol(refused)
            refused.connection_made(transport)
            return
        self._admitted = True
        # JoinedWritesProtocol.connection_made, with the wrapper that reports unsent bytes.
        HttpToolsProtocol.connection_made(
            self, _BoundedWrites(transport, self.loop, self._close_waits))  # type: ignore[arg-type]
        self._arm("header", self.guard.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self.guard.release()
        self._disarm()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._deadline is not None:
            if self._deadline_kind == "body":
                self._last_read = self.loop.time()
            return
        reading = self._reading
        if reading == "body":
            self._arm("body", self.guard.limits.body_timeout_s)
        elif (reading == "headers" or self.cycle is None or self.cycle.response_complete) \
                and not self.transport.is_closing():
            # Half a request, or bytes that began none (blank lines): the header clock runs.
            self._arm("header", self.guard.limits.header_timeout_s)

    # -- parser callbacks: where a request is -----------------------------------------------
    def on_message_begin(self) -> None:
        self._reading = "headers"
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._reading = "body"
        if self._deadline is not None:
            self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._reading = None
        if self._deadline is not None:
            self._disarm()
        super().on_message_complete()

    # -- deadlines -------------------------------------------------------------------------
    def _arm(self, kind: str, seconds: float) -> None:
        self._deadline_kind = kind
        self._last_read = self.loop.time()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _busy(self) -> bool:
        """Reading is stopped by us (the app is behind), or a response is being written: the
        client is not the one who is late."""
        cycle: RequestResponseCycle | None = self.cycle  # None before a first request
        if cycle is None:
            return self.flow.read_paused
        return self.flow.read_paused or (
            # a pipelined request's headers while the one before it is answered
            self._reading == "headers" and not cycle.response_complete) or (
            # a body the client holds back until the app's receive() sends 100 Continue
            self._reading == "body" and cycle.waiting_for_100_continue)

    def _expired(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport.is_closing():
            return
        kind = self._deadline_kind
        limits = self.guard.limits
        if self._busy():
            self._deadline_kind = kind
            self._deadline = self.loop.call_later(
                limits.header_timeout_s if kind == "header" else limits.body_timeout_s,
                self._expired)
            return
        if kind == "body":
            quiet = self.loop.time() - self._last_read
            if quiet < limits.body_timeout_s:  # data came since: wait out the rest
                self._deadline_kind = kind
                self._deadline = self.loop.call_later(limits.body_timeout_s - quiet,
                                                      self._expired)
                return
        self.guard.timed_out(kind)
        cycle = self.cycle
        if kind == "header":
            if self._reading == "headers":  # a request had begun: tell it why
                transport.write(self.guard.header_408)
        elif cycle is not None and not cycle.response_started:
            # The app waits in receive(): it sees the client gone, and writes nothing more.
            cycle.disconnected = True
            cycle.message_event.set()
            transport.write(self.guard.body_408)
        transport.close()

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self.guard.timed_out("keep_alive")
        super().timeout_keep_alive_handler()

    # -- write flow control ----------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        self.guard.write_waits += 1
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.guard.limits.write_timeout_s,
                                                     self._write_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _close_waits(self) -> None:
        if self._write_timer is None and self._admitted:  # (a close after the loss: nothing)
            self._write_timer = self.loop.call_later(self.guard.limits.write_timeout_s,
                                                     self._write_expired)

    def _write_expired(self) -> None:
        self._write_timer = None
        if not self._admitted:
            return
        self.guard.timed_out("write")
        # abort, not close: close waits for the buffer to drain, which this reader never lets.
        # And linger 0, so the kernel resets the connection and drops what it holds for this
        # reader, rather than keep an orphan socket with megabytes queued trying to deliver.
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

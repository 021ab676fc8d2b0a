"""A small raw HTTP/1.1 client for load generators: keep-alive, pre-built request bytes.

Why hand-written: a load generator on a 2-core machine shares the CPU with what it measures.
In the soak at 400 req/s offered an httpx client used 94-100% of a core (calibserve 31-52%),
fell behind, and its own queueing showed up as the server's latency (that is what made the
first 400 req/s soak fail; this client used 8-12% in the soak that passed, RESULTS.md).
This client does only what a benchmark needs: write pre-built bytes, read one response
(content-length or chunked), keep the connection for the next request. `Conn.stream` reads a
chunked server-sent-events answer and times it: when the first `data:` event arrived, when the
last one did, and how many there were.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any

_CONTENT_LENGTH = re.compile(rb"content-length:\s*(\d+)")


class Conn:
    """One keep-alive connection; `request` sends raw bytes and reads one whole response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        m = _CONTENT_LENGTH.search(lower)
        if m:
            body = await self.reader.readexactly(int(m.group(1)))
        elif b"transfer-encoding: chunked" in lower:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        else:
            body = await self.reader.read()
        self.last_used = time.monotonic()
        return status, body

    async def stream(self, raw: bytes) -> Streamed:
        """Send `raw`, read one SSE answer (chunked, or a whole body for an error), timing its
        `data:` events as they arrive. Events are counted per HTTP chunk (an event split across
        two chunks is counted where its `data:` starts); times are `time.perf_counter()`."""
        t0 = time.perf_counter()
        self.writer.write(raw)
        reader = self.reader
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        first = last = 0.0
        events = 0
        tail = b""
        if b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                found = chunk.count(b"data:")
                if found:
                    last = time.perf_counter()
                    if not events:
                        first = last
                    events += found
                tail = chunk[-32:]
        else:
            m = _CONTENT_LENGTH.search(lower)
            body = await (reader.readexactly(int(m.group(1))) if m else reader.read())
            events = body.count(b"data:")
            if events:
                first = last = time.perf_counter()
            tail = body[-32:]
        end = time.perf_counter()
        self.last_used = time.monotonic()
        return Streamed(status, t0, first, last, end, events, b"[DONE]" in tail)

    def close(self) -> None:
        self.writer.close()


@dataclass(frozen=True, slots=True)
class Streamed:
    """One streamed answer's timing (perf_counter seconds) and shape."""

    status: int
    sent: float  # the request was written
    first: float  # the first `data:` event arrived (0.0: none did)
    last: float  # the last one did
    end: float  # the terminating chunk arrived
    events: int
    done: bool  # `data: [DONE]` ended it

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def total(self) -> float:
        return self.end - self.sent

    @property
    def per_chunk(self) -> float:
        """Mean gap between successive events after the first."""
        return (self.last - self.first) / (self.events - 1) if self.events > 1 else 0.0


class ConnPool:
    """Keep-alive connections to one server, most recently used first.

    A connection idle for longer than `max_idle_s` is closed rather than reused, so that a
    server's keep-alive timeout (uvicorn: 5 s) never closes one under a request.
    """

    def __init__(self, host: str, port: int, max_idle_s: float = 4.0) -> None:
        self.host = host
        self.port = port
        self.max_idle_s = max_idle_s
        self._idle: list[Conn] = []
        self.opened = 0

    async def get(self) -> Conn:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.last_used < self.max_idle_s and not conn.reader.at_eof():
                return conn
            conn.close()
        self.opened += 1
        return await Conn.open(self.host, self.port)

    def put(self, conn: Conn) -> None:
        self._idle.append(conn)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    def build(self, path: str, body: dict[str, Any]) -> bytes:
        return build_request(self.host, self.port, path, body)


def build_request(host: str, port: int, path: str, body: dict[str, Any],
                  headers: dict[str, str] | None = None) -> bytes:
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer sk-bench\r\n{extra}content-length: {len(data)}\r\n\r\n"
            ).encode() + data

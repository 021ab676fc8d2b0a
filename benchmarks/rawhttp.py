"""A small raw HTTP/1.1 client for load generators: keep-alive, pre-built request bytes.

Why hand-written: a load generator on a 2-core machine shares the CPU with what it measures.
In the soak at 400 req/s offered an httpx client used 94-100% of a core (calibserve 31-52%),
fell behind, and its own queueing showed up as the server's latency (that is what made the
first 400 req/s soak fail; this client used 8-12% in the soak that passed, RESULTS.md).
This client does only what a benchmark needs: write pre-built bytes, read one response
(content-length or chunked), keep the connection for the next request.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
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

    def close(self) -> None:
        self.writer.close()


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

"""A lean HTTP/1.1 transport for httpx, for the hop from calibserve to plain-http upstreams.

httpx's default transport (httpcore on anyio) costs about 0.5 ms of CPU per request, several
times what calibserve itself spends on a request; this keep-alive connection pool over asyncio
streams does the same job for `http://` upstreams (vLLM next to us) at a fraction of that. https
upstreams (hosted APIs) keep httpx's default transport. Errors are raised as the httpx exceptions
routing/ already maps (ConnectError, ConnectTimeout, RemoteProtocolError, ReadError), and a
connection is only reused after a response was read to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx

MAX_HEADER_BYTES = 64 * 1024


class _Conn:
    __slots__ = ("reader", "writer", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _Body(httpx.AsyncByteStream):
    """A response body read from the connection as the caller iterates."""

    def __init__(self, transport: LeanTransport, key: tuple[str, int], conn: _Conn,
                 length: int | None, chunked: bool, keep_alive: bool) -> None:
        self._transport = transport
        self._key = key
        self._conn = conn
        self._length = length
        self._chunked = chunked
        self._keep_alive = keep_alive
        self._done = False
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reader = self._conn.reader
        try:
            if self._chunked:
                while True:
                    line = await reader.readuntil(b"\r\n")
                    size = int(line.split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")  # no trailers from vLLM / OpenAI
                        break
                    data = await reader.readexactly(size + 2)
                    yield data[:-2]
            elif self._length is not None:
                remaining = self._length
                while remaining > 0:
                    data = await reader.read(min(remaining, 65536))
                    if not data:
                        raise httpx.RemoteProtocolError("connection closed before the body ended")
                    remaining -= len(data)
                    yield data
            else:  # no length: the body runs until the server closes the connection
                self._keep_alive = False
                while data := await reader.read(65536):
                    yield data
            self._done = True
        except (asyncio.IncompleteReadError, ConnectionError, ValueError,
                asyncio.LimitOverrunError) as exc:
            raise httpx.ReadError(f"reading the response body failed: {exc!r}") from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._done and self._keep_alive:
            self._transport._release(self._key, self._conn)
        else:
            self._conn.close()


class RawResponse:
    """An answer from `LeanTransport.exchange`: status, raw headers and the unread body."""

    __slots__ = ("status_code", "headers", "_body")

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]], body: _Body) -> None:
        self.status_code = status_code
        self.headers = headers
        self._body = body

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool (or is closed)."""
        try:
            parts = [part async for part in self._body]
        finally:
            await self._body.aclose()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (one item per HTTP chunk of a chunked answer)."""
        return self._body.__aiter__()

    async def aclose(self) -> None:
        await self._body.aclose()


class LeanTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 client connections over asyncio streams (http:// only)."""

    def __init__(self, max_idle_per_host: int = 256) -> None:
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._max_idle = max_idle_per_host

    def _release(self, key: tuple[str, int], conn: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if conn.usable() and len(idle) < self._max_idle:
            conn.reused = True
            idle.append(conn)
        else:
            conn.close()

    async def _connect(self, key: tuple[str, int], timeout: float | None,
                       fresh: bool = False) -> _Conn:
        idle = None if fresh else self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
            conn.close()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(key[0], key[1], limit=MAX_HEADER_BYTES * 16), timeout)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {key[0]}:{key[1]} timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc}") from exc
        return _Conn(reader, writer)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol("LeanTransport handles http:// only")
        key = (url.host, url.port or 80)
        timeouts = request.extensions.get("timeout") or {}
        body = request.content if hasattr(request, "_content") else await request.aread()
        target = url.raw_path.decode("ascii")
        lines = [f"{request.method} {target} HTTP/1.1\r\n".encode()]
        has_length = False
        for name, value in request.headers.raw:
            if name.lower() == b"content-length":
                has_length = True
            if name.lower() == b"transfer-encoding":
                continue
            lines.append(name + b": " + value + b"\r\n")
        if not has_length and (body or request.method in ("POST", "PUT", "PATCH")):
            lines.append(b"content-length: " + str(len(body)).encode() + b"\r\n")
        head = b"".join(lines) + b"\r\n"
        status, headers, stream = await self._send(key, head, body, timeouts.get("connect"),
                                                   request.method == "HEAD")
        return httpx.Response(status, headers=headers, stream=stream,
                              extensions={"http_version": b"HTTP/1.1"})

    async def exchange(self, method: str, host: str, port: int, head: bytes, body: bytes,
                       connect_timeout: float | None) -> RawResponse:
        """One request without httpx's request/response objects (routing's hot path).

        `head` is the request line and headers, ready to send (content-length included, ending
        in the blank line); the answer's body is read from the returned `RawResponse`. Errors
        are the same httpx exceptions `handle_async_request` raises.
        """
        status, headers, stream = await self._send((host, port), head, body, connect_timeout,
                                                   method == "HEAD")
        return RawResponse(status, headers, stream)

    async def _send(self, key: tuple[str, int], head: bytes, body: bytes,
                    connect_timeout: float | None, head_only: bool
                    ) -> tuple[int, list[tuple[bytes, bytes]], _Body]:
        for attempt in (1, 2):
            # The retry opens a new connection: the next idle one may be just as stale.
            conn = await self._connect(key, connect_timeout, fresh=attempt == 2)
            try:
                conn.writer.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    conn.writer.write(body)
                return await self._read_head(key, conn, head_only)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                conn.close()
                got_nothing = isinstance(exc, asyncio.IncompleteReadError) and not exc.partial
                # A kept-alive connection the server closed while idle: safe to try a new one,
                # since the server never saw this request.
                if attempt == 1 and conn.reused and (got_nothing or isinstance(
                        exc, ConnectionResetError | BrokenPipeError)):
                    continue
                raise httpx.RemoteProtocolError(f"server disconnected: {exc!r}") from exc
            except BaseException:
                conn.close()  # cancelled or timed out mid-request: the connection is dirty
                raise
        raise AssertionError("unreachable")

    async def _read_head(self, key: tuple[str, int], conn: _Conn, head_only: bool
                         ) -> tuple[int, list[tuple[bytes, bytes]], _Body]:
        try:
            raw = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise httpx.RemoteProtocolError("response headers too large") from exc
        status_line, _, header_block = raw[:-4].partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise httpx.RemoteProtocolError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        headers: list[tuple[bytes, bytes]] = []
        length: int | None = None
        chunked = False
        keep_alive = parts[0] == b"HTTP/1.1"
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            value = value.strip()
            lname = name.strip().lower()
            if lname == b"content-length":
                length = int(value)
            elif lname == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lname == b"connection":
                keep_alive = b"close" not in value.lower()
            headers.append((name.strip(), value))
        if head_only or status in (204, 304) or 100 <= status < 200:
            length = 0
        stream = _Body(self, key, conn, length if not chunked else None, chunked, keep_alive)
        return status, headers, stream

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

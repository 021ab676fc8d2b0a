"""The lean HTTP/1.1 transport: bodies, streams, keep-alive reuse and error mapping."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import httpx
import pytest

from calibserve.routing.transport import LeanTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def with_server(handler: Handler, test: Callable[[str], Awaitable[None]]) -> None:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await test(f"http://127.0.0.1:{port}")
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return await reader.readexactly(length)


def test_content_length_chunked_and_reuse() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            if body == b"stream":
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: %d\r\nx-a: 1\r\n\r\n%s"
                             % (len(body), body))
            await writer.drain()

    async def test(url: str) -> None:
        async with httpx.AsyncClient(transport=LeanTransport()) as client:
            r = await client.post(url + "/echo?q=1", content=b"payload")
            assert (r.status_code, r.content, r.headers["x-a"]) == (201, b"payload", "1")
            async with client.stream("POST", url, content=b"stream") as s:
                parts = [p async for p in s.aiter_raw()]
            assert b"".join(parts) == b"hello world"
            for _ in range(3):
                assert (await client.post(url, json={"k": 1})).json() == {"k": 1}
        assert connections == 1  # kept alive throughout

    asyncio.run(with_server(handler, test))


def test_server_closing_idle_connection_is_retried_once() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await read_request(reader)
        # Claims keep-alive, then closes: the next request on this connection finds EOF.
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async def test(url: str) -> None:
        async with httpx.AsyncClient(transport=LeanTransport()) as client:
            for i in range(3):
                assert (await client.post(url, content=b"%d" % i)).content == b"%d" % i

    asyncio.run(with_server(handler, test))


def test_retry_after_a_stale_connection_does_not_take_another_idle_one() -> None:
    # Every connection answers one request and drops the next without a reply (as a server that
    # restarted behind a pool of kept-alive connections): the retry must connect afresh, since
    # the pool's other idle connections are just as dead.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await read_request(reader)
        writer.close()

    async def test(url: str) -> None:
        async with httpx.AsyncClient(transport=LeanTransport()) as client:
            first = await asyncio.gather(*(client.post(url, content=b"x") for _ in range(3)))
            assert [r.status_code for r in first] == [200] * 3  # three connections now idle
            assert (await client.post(url, content=b"after")).content == b"after"

    asyncio.run(with_server(handler, test))


def test_errors_map_to_httpx_exceptions() -> None:
    async def refused() -> None:
        async with httpx.AsyncClient(transport=LeanTransport()) as client:
            await client.get("http://127.0.0.1:9/")

    with pytest.raises(httpx.ConnectError):
        asyncio.run(refused())

    async def truncate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
        await writer.drain()
        writer.close()

    async def test(url: str) -> None:
        async with httpx.AsyncClient(transport=LeanTransport()) as client:
            with pytest.raises(httpx.TransportError):
                await client.post(url, content=b"x")

    asyncio.run(with_server(truncate, test))

    async def https() -> None:
        async with httpx.AsyncClient(transport=LeanTransport()) as client:
            await client.get("https://127.0.0.1:9/")

    with pytest.raises(httpx.UnsupportedProtocol):
        asyncio.run(https())


def test_upstream_raw_path_sends_and_reads_what_the_httpx_path_does() -> None:
    """`Upstream` over `LeanTransport.exchange` (no httpx objects) against httpx's own path:
    the same request line, headers (less accept-encoding) and body; the same decoded answers,
    streams and errors."""
    from calibserve.routing import Upstream, UpstreamClientError

    seen: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
    answer = b'{"id": "x", "big": 123456789012345678901234567890, "t": "\\u00e9\xe2\x80\xa8"}'
    events = (b'data: {"a": 1}\n\n: ping\n\ndata: {"b": "\xe2\x80\xa8"}\r\n\r\n'
              b"data: [DONE]\n\n")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            line, *rest = head[:-4].split(b"\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (h.partition(b":") for h in rest)}
            body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
            seen.append((line, headers, body))
            if b"stream" in body:
                chunk = b"%x\r\n" % len(events) + events + b"\r\n0\r\n\r\n"
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk)
            elif b"bad" in body:
                err = b'{"error": {"message": "no such model"}}'
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: %d\r\n\r\n" % len(err)
                             + err)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(answer)
                             + answer)
            await writer.drain()

    async def test(url: str) -> None:
        results = []
        for transport in (LeanTransport(), None):
            up = Upstream("u", url + "/v1", api_key="k", transport=transport)
            got = await up.request_json("chat/completions", {"model": "m"})
            chunks = [c async for c in up.stream("/v1/chat/completions", {"stream": True})]
            with pytest.raises(UpstreamClientError) as err:
                await up.request_json("chat/completions", {"model": "bad"})
            results.append((got, chunks, err.value.status_code, err.value.body, str(err.value)))
            await up.aclose()
        assert results[0] == results[1]
        assert results[0][0]["big"] == 123456789012345678901234567890
        assert results[0][1] == [{"a": 1}, {"b": "\u2028"}]
        lean, plain = seen[:3], seen[3:]
        for (l_line, l_headers, l_body), (p_line, p_headers, p_body) in zip(lean, plain,
                                                                            strict=True):
            p_headers.pop(b"accept-encoding", None)
            assert (l_line, l_headers, l_body) == (p_line, p_headers, p_body)

    asyncio.run(with_server(handler, test))

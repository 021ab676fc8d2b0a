"""uvicorn's httptools protocol with each response's head and body sent in one write.

uvicorn writes a response's status line and headers on `http.response.start` and its body on
`http.response.body`: two `send()` system calls and two TCP segments for every JSON answer, and
on loopback the kernel's work for each is a tenth of what a proxied request costs in CPU. Here
the connection's writes made in one turn of the event loop are joined and sent at the end of
that turn: a JSON response (start and body are sent without the loop running in between)
leaves in one segment. Nothing waits longer than the current loop turn, so a stream's chunks
still go out as they are produced; bytes, order and flow control are uvicorn's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _JoinedWrites:
    """A transport whose writes in one loop turn are handed to the real one as one write."""

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = [data]
            self._loop.call_soon(self.flush)
        else:
            self._held.append(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading, ...
        return getattr(self._transport, name)


class JoinedWritesProtocol(HttpToolsProtocol):
    """`uvicorn.Config(http=JoinedWritesProtocol)`: httptools, one write per response."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_JoinedWrites(transport, self.loop))  # type: ignore[arg-type]

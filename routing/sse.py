"""Server-sent events as OpenAI-compatible servers send them: `data: {json}` ... `data: [DONE]`."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from calibserve.routing.jsoncodec import loads

DONE = "[DONE]"


async def iter_sse_data(lines: AsyncIterator[str]) -> AsyncGenerator[str, None]:
    """Yield the data payload of each event (multi-line data joined with newlines)."""
    data: list[str] = []
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


async def iter_sse_bytes(chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """`iter_sse_data` over the raw body: the data payload of each event, as bytes.

    Lines end at LF (a CR before it is dropped), which is how OpenAI-compatible servers end
    them; unlike a text line splitter it never breaks an event at a U+2028 inside the JSON.
    Decoding bytes per event instead of text per line is what keeps a streamed chunk cheap.
    """
    buffer = b""
    data: list[bytes] = []
    async for chunk in chunks:
        buffer = buffer + chunk if buffer else chunk
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    yield data[0] if len(data) == 1 else b"\n".join(data)
                    data = []
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            elif line == b"data":
                data.append(b"")
            # comments (":...") and other fields (event, id, retry) carry no payload here
        buffer = buffer[start:]
    line = buffer.rstrip(b"\r")  # a last line without its LF
    if line.startswith(b"data:"):
        value = line[5:]
        data.append(value[1:] if value.startswith(b" ") else value)
    if data:
        yield b"\n".join(data)


def parse_chunk(payload: str | bytes) -> dict[str, Any]:
    """Decode one event's JSON payload; raises ValueError when it is not a JSON object."""
    obj = loads(payload)
    if not isinstance(obj, dict):
        raise ValueError("SSE payload is not a JSON object")
    return obj

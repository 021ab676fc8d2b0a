"""Server-sent events as OpenAI-compatible servers send them: `data: {json}` ... `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

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


def parse_chunk(payload: str) -> dict[str, Any]:
    """Decode one event's JSON payload; raises ValueError when it is not a JSON object."""
    obj = json.loads(payload)
    if not isinstance(obj, dict):
        raise ValueError("SSE payload is not a JSON object")
    return obj

"""ASGI middleware that refuses request bodies over a size limit with an OpenAI-shaped 413.

It checks Content-Length up front and also counts bytes as they arrive (chunked uploads, lying
headers), so an oversized body is never buffered whole. Pure ASGI rather than Starlette's
BaseHTTPMiddleware, which would add latency to every request.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from calibserve.server.errors import error_body


class BodyTooLarge(Exception):
    """Raised inside the app's receive() once the limit is passed."""


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send) -> None:
        body = json.dumps(error_body(
            f"request body is larger than the limit of {self.max_bytes} bytes",
            "RequestEntityTooLargeError", None, 413,
        )).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send)
                    return
                break
        received = 0
        state: dict[str, Any] = {"too_large": False, "started": False}

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    state["too_large"] = True
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            # Frameworks turn errors while reading the body into their own 400: replace it.
            if state["too_large"]:
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await self._reject(send)
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not state["started"]:
                state["started"] = True
                await self._reject(send)

"""Forwarding a request to a model's engine as it is: the routes calibserve does not score.

`/tokenize`, `/detokenize`, `/v1/responses/{id}`, `/version`, ... and any other path of vLLM's
server that calibserve has no route of its own for go to the primary tier of the model the body
names (`model`, renamed to the engine's name; the first model when there is none) and come back
with the engine's status, body and content headers unchanged. They go through the tier's one
upstream client (`UpstreamClient.open`: its retries, breaker and replica choice, as chat's), and
wait through engine_watch.guard, so a managed engine that dies under a request is a prompt 503.
An engine that cannot be reached is a 503, one that does not answer within the tier's
`timeout_s` a 504, a broken answer a 502, in the one error shape (errors.py). The Responses API
(responses.py) uses the same `open` and `read`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from calibserve.routing import UpstreamError
from calibserve.server.engine_watch import (
    ClientDisconnected,
    engine_died,
    engine_stopped,
    guard,
)
from calibserve.server.errors import APIError
from calibserve.server.runtime import ModelRuntime, ServerRuntime

# Headers that describe the hop, not the content: never copied across it.
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "date",
                  "server", "host", "content-encoding", "accept-encoding", "upgrade", "te",
                  "trailer", "proxy-authorization", "proxy-authenticate", "authorization"})


class Forwarder:
    """Relays requests to a model's primary tier; `forward` answers one, `open` starts one."""

    def __init__(self, runtime: ServerRuntime) -> None:
        self.rt = runtime

    def model_for(self, name: Any) -> ModelRuntime | None:
        """The model a body names (None: not one of ours); the first model when it names none."""
        if isinstance(name, str):
            return self.rt.models.get(name)
        return next(iter(self.rt.models.values()), None)

    async def open(self, request: Request, model: ModelRuntime, method: str, target: str,
                   content: bytes, headers: Mapping[str, str]) -> httpx.Response:
        """Send a request to `model`'s primary tier; its answer (any status), body unread.

        Raises APIError when nothing answered: the engine died under it or was not running
        (503), could not be reached (503), did not answer in time (504), broke off (502);
        ClientDisconnected when the client went away first.
        """
        primary = model.primary
        if primary.engine is not None and not primary.up:
            raise APIError(503, f"the engine for `{model.name}` is not running (restarting)",
                           code="engine_unavailable", headers={"Retry-After": "1"})
        try:
            return await guard(primary.upstream.open(method, target, content, headers),
                               request, primary.engine, model.name)
        except UpstreamError as exc:
            if await engine_died(primary.engine, exc):
                raise engine_stopped(model.name) from exc
            raise upstream_failure(model, exc) from exc

    async def forward(self, request: Request, path: str) -> Response:
        """Relay `request` to the engine; its answer comes back unchanged."""
        content = await request.body()
        model = self.model_for(None)
        ctype = request.headers.get("content-type", "")
        if content and "json" in ctype:
            with contextlib.suppress(ValueError):
                body = json.loads(content)
                if isinstance(body, dict) and "model" in body:
                    named = self.model_for(body["model"])
                    if named is not None:
                        model = named
                        upstream_model = named.primary.upstream_model
                        if body["model"] != upstream_model:
                            body["model"] = upstream_model
                            content = json.dumps(body).encode()
        if model is None:
            raise APIError(404, f"no model serves {path}", code="model_not_found")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        target = path + (f"?{request.url.query}" if request.url.query else "")
        try:
            upstream = await self.open(request, model, request.method, target, content, headers)
        except ClientDisconnected:
            return Response(status_code=499)
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(_relay(upstream), status_code=upstream.status_code,
                                     headers=out_headers)
        data = await self.read(model, upstream)
        return Response(data, status_code=upstream.status_code, headers=out_headers)

    @staticmethod
    async def read(model: ModelRuntime, upstream: httpx.Response) -> bytes:
        """The whole body of an answer `open` returned, then the connection is released; an
        engine that breaks off mid-body is a 502."""
        try:
            async with asyncio.timeout(model.primary.settings.timeout_s):
                return await upstream.aread()
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise APIError(504, f"the engine for `{model.name}` did not finish its answer in "
                           "time", code="upstream_timeout") from exc
        except httpx.HTTPError as exc:
            raise APIError(502, f"the engine for `{model.name}` broke off its answer: {exc!r}",
                           code="upstream_protocol") from exc
        finally:
            await upstream.aclose()


def upstream_failure(model: ModelRuntime, exc: UpstreamError) -> APIError:
    """calibserve's own 502/503/504 for an engine that gave no answer to relay."""
    headers = {"Retry-After": str(max(1, round(exc.retry_after or 1)))} \
        if exc.status_code == 503 else None
    return APIError(exc.status_code, f"the engine for `{model.name}`: {exc}",
                    code="upstream_" + exc.kind, headers=headers)


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for data in upstream.aiter_raw():
            yield data
    finally:
        await upstream.aclose()

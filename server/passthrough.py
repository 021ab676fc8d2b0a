"""Forwarding a request to a model's engine as it is: the routes calibserve does not score.

`/tokenize`, `/detokenize`, `/v1/responses/{id}`, `/version`, ... and any other path of vLLM's
server that calibserve has no route of its own for go to the primary tier's engine of the model the
body names (`model`, renamed to the engine's name; the first model when there is none) and come back
with the engine's status, body and content headers unchanged. An engine that cannot be reached is
a 503, one that does not answer within the tier's `timeout_s` a 504, in the one error shape
(errors.py). The Responses API (responses.py) uses the same client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from calibserve.routing import server_root
from calibserve.server.errors import APIError
from calibserve.server.runtime import ModelRuntime, ServerRuntime
from calibserve.server.transport import LeanTransport

# Headers that describe the hop, not the content: never copied across it.
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "date",
                  "server", "host", "content-encoding", "accept-encoding", "upgrade", "te",
                  "trailer", "proxy-authorization", "proxy-authenticate", "authorization"})


class Forwarder:
    """One HTTP client per engine base URL; `forward` relays a request, `open` starts one."""

    def __init__(self, runtime: ServerRuntime) -> None:
        self.rt = runtime
        self._clients: dict[str, httpx.AsyncClient] = {}

    def model_for(self, name: Any) -> ModelRuntime | None:
        """The model a body names (None: not one of ours); the first model when it names none."""
        if isinstance(name, str):
            return self.rt.models.get(name)
        return next(iter(self.rt.models.values()), None)

    def root(self, model: ModelRuntime) -> str:
        tier = model.primary
        return server_root(tier.engine.url if tier.engine is not None else tier.upstream.base_url)

    def _client(self, root: str, model: ModelRuntime) -> httpx.AsyncClient:
        client = self._clients.get(root)
        if client is None:
            headers = {}
            key = model.primary.settings.resolved_api_key()
            if key:
                headers["authorization"] = f"Bearer {key}"
            timeout = model.primary.settings.timeout_s
            client = httpx.AsyncClient(
                transport=LeanTransport() if root.startswith("http://") else None,
                timeout=httpx.Timeout(timeout, connect=min(5.0, timeout)), headers=headers)
            self._clients[root] = client
        return client

    async def open(self, model: ModelRuntime, method: str, path: str, content: bytes,
                   headers: dict[str, str]) -> httpx.Response:
        """Send a request to `model`'s engine and return the response with its body unread."""
        root = self.root(model)
        client = self._client(root, model)
        request = client.build_request(method, root + path, content=content, headers=headers)
        try:
            # An asyncio deadline too: the lean transport does not enforce httpx's timeouts.
            async with asyncio.timeout(model.primary.settings.timeout_s):
                return await client.send(request, stream=True)
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise APIError(504, f"the engine for `{model.name}` did not answer in time",
                           code="upstream_timeout") from exc
        except httpx.HTTPError as exc:
            raise APIError(503, f"the engine for `{model.name}` is unavailable: {exc!r}",
                           code="upstream_connect", headers={"Retry-After": "1"}) from exc

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
        upstream = await self.open(model, request.method, target, content, headers)
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

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for data in upstream.aiter_raw():
            yield data
    finally:
        await upstream.aclose()

"""`UpstreamClient`: what routing needs of an upstream, whoever implements it.

`routing.Upstream` (one endpoint behind timeouts, retries and a breaker) satisfies it, and so does
`routing.ReplicaPool` (several replicas of one model); a `Tier` holds any of them. Every route
reaches the engine through one: the scored routes by `request_json` and `stream`, the Responses
API and the pass-through routes by `open`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import httpx


class UpstreamClient(Protocol):
    """An OpenAI-compatible endpoint. Failures raise `routing.UpstreamError` subclasses."""

    @property
    def name(self) -> str:
        """The `upstream` label of its metrics and errors."""
        ...

    @property
    def base_url(self) -> str:
        """The URL it was configured with (`/v1` root or not; see identity.api_root)."""
        ...

    async def request_json(
        self, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """POST `body` (GET when None) to `path` under the `/v1` root; the decoded JSON object."""
        ...

    async def open(self, method: str, target: str, content: bytes,
                   headers: Mapping[str, str]) -> httpx.Response:
        """Send a request as a client sent it (`target` under the server root, query included);
        the answer with any status and its body unread (close it when done)."""
        ...

    def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST a streaming request; each SSE event's JSON object until `[DONE]`. Closing the
        iterator abandons the stream (and the generation upstream)."""
        ...

    async def aclose(self) -> None:
        """Close its HTTP connections."""
        ...

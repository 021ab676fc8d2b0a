"""Several replicas of one model (`--upstream URL1,URL2`) behind the interface of one upstream.

vLLM is the distributed engine; calibserve only spreads requests over the replicas it is given,
round robin, skipping replicas whose circuit is open and moving to the next replica when one
cannot be reached before anything was sent (connect errors, open circuit). Failures after a
replica answered are not retried elsewhere: the request may already have been processed.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from calibserve.routing.breaker import CircuitState
from calibserve.routing.errors import UpstreamUnavailable
from calibserve.routing.upstream import Upstream


class ReplicaPool:
    """An `UpstreamClient` over several `Upstream` replicas of one model."""

    def __init__(self, name: str, replicas: list[Upstream]) -> None:
        if not replicas:
            raise ValueError(f"{name}: a replica pool needs at least one upstream")
        self.name = name
        self.replicas = replicas
        self.base_url = replicas[0].base_url
        self.breaker = replicas[0].breaker
        self._next = itertools.cycle(range(len(replicas)))

    def __repr__(self) -> str:
        return f"ReplicaPool({self.name!r}, {[r.base_url for r in self.replicas]})"

    def _order(self) -> list[Upstream]:
        start = next(self._next)
        ordered = self.replicas[start:] + self.replicas[:start]
        healthy = [r for r in ordered if r.breaker.state is not CircuitState.OPEN]
        return healthy + [r for r in ordered if r not in healthy]

    async def request_json(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        error: UpstreamUnavailable | None = None
        for replica in self._order():
            try:
                return await replica.request_json(path, body)
            except UpstreamUnavailable as exc:
                error = exc
        assert error is not None
        raise error

    async def open(self, method: str, target: str, content: bytes,
                   headers: Mapping[str, str]) -> httpx.Response:
        error: UpstreamUnavailable | None = None
        for replica in self._order():
            try:
                return await replica.open(method, target, content, headers)
            except UpstreamUnavailable as exc:
                error = exc
        assert error is not None
        raise error

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        error: UpstreamUnavailable | None = None
        for replica in self._order():
            events = replica.stream(path, body)
            try:
                first = await anext(events)
            except StopAsyncIteration:
                return
            except UpstreamUnavailable as exc:
                await events.aclose()
                error = exc
                continue
            try:
                yield first
                async for event in events:
                    yield event
            finally:
                await events.aclose()
            return
        assert error is not None
        raise error

    async def aclose(self) -> None:
        for replica in self.replicas:
            await replica.aclose()

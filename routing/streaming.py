"""Routing a streaming request through a route's stream mode (see streaming_mode.py).

What the client receives in every mode: the chunks of exactly one tier, each choice's finish
chunk carrying that tier's `confidence`, then (not sent) a final RoutedChunk with the result.
Fallback when the primary cannot start streaming works in every mode. A stronger tier that fails
before its first chunk leaves the client with the primary's answer and `escalation_error`; one
that fails after chunks were sent raises from the iterator (nothing better can be done then).
Routes that cannot escalate (one tier, or `never`) always stream as `off`: holding the answer
back would cost latency and could change nothing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from calibserve.routing import metrics
from calibserve.routing.agreement import answers_agree
from calibserve.routing.errors import UpstreamClientError, UpstreamError
from calibserve.routing.policy import Decision
from calibserve.routing.result import RoutedChunk, RoutedResult
from calibserve.routing.route import Route
from calibserve.routing.scoring import decision_score
from calibserve.routing.streaming_mode import OFF
from calibserve.routing.tier_stream import TierStream


class StreamRun:
    """One streaming request. Use `run()` once."""

    def __init__(self, route: Route, endpoint: str, body: dict[str, Any]) -> None:
        self.route = route
        self.endpoint = endpoint
        self.body = body
        self.result = RoutedResult(route=route.name)
        self.mode = route.mode if route.can_escalate else OFF
        self.n = max(1, int(body.get("n") or 1))
        self._open: list[TierStream] = []

    async def run(self) -> AsyncGenerator[RoutedChunk, None]:
        try:
            # aclosing: a client that goes away closes this generator, and with it the upstream
            # responses (vLLM aborts generations whose connection closes).
            async with aclosing(self._route()) as items:
                async for item in items:
                    yield item
        finally:
            for stream in self._open:
                await stream.aclose()
        yield RoutedChunk(None, self.result)

    async def _route(self) -> AsyncGenerator[RoutedChunk, None]:
        result = self.result
        primary, first, index = await self._start()
        if index > 0:
            tier = primary.tier
            result.served_by, result.escalated, result.reason = tier.name, True, "primary_failed"
            metrics.ESCALATIONS.labels(
                route=self.route.name, reason="primary_failed", tier=tier.name
            ).inc()
            async for item in self._drain(primary, [first]):
                yield item
            return
        result.served_by = primary.tier.name
        if self.mode.kind == "off":
            async for item in self._drain(primary, [first]):
                yield item
            result.primary_confidence = result.confidence
            return

        held = [first]
        while not self._decidable(primary):
            chunk = await primary.next()
            if chunk is None:
                break
            held.append(chunk)
        score = decision_score(
            [primary.state(i).score() for i in range(self.n) if i in primary.choices]
        )
        result.primary_confidence = score
        decision = self.route.policy.decide(0.0 if score is None else score)
        result.threshold = decision.threshold
        stronger = await self._escalate(decision) if decision.escalate else None
        if stronger is None:
            # Not escalating (or every stronger tier failed): the primary's answer, held part first.
            async for item in self._drain(primary, held):
                yield item
            return
        other, other_first = stronger
        primary_complete = primary.ended or primary.finished(0)
        await primary.aclose()  # abandons the primary's generation upstream
        async for item in self._drain(other, [other_first]):
            yield item
        result.agreement = answers_agree(
            primary.text(0), other.text(0), primary_complete=primary_complete
        )
        if result.agreement is not None:
            metrics.AGREEMENT.labels(
                route=self.route.name, agreed=str(result.agreement).lower()
            ).inc()

    def _decidable(self, primary: TierStream) -> bool:
        """Enough of the primary's answer to decide on? buffer: all of it; prefix:N: N tokens."""
        if primary.ended:
            return True
        if self.mode.kind != "prefix":
            return False
        for i in range(self.n):
            if i not in primary.choices:
                return False
            state = primary.choices[i]
            if not state.finished and state.tokens < self.mode.prefix_tokens:
                return False
        return True

    async def _start(self) -> tuple[TierStream, dict[str, Any] | None, int]:
        """The first tier that starts streaming (primary, else fallbacks in order)."""
        first_error: UpstreamError | None = None
        for index, tier in enumerate(self.route.tiers):
            try:
                stream, first = await TierStream.open(
                    tier, self.endpoint, self.body, self.result, self.route.name
                )
            except UpstreamClientError:
                if index == 0:
                    raise
                continue
            except UpstreamError as exc:
                if first_error is None:
                    first_error = exc
                    self.result.primary_error = str(exc)
                continue
            self._open.append(stream)
            return stream, first, index
        assert first_error is not None
        raise first_error

    async def _escalate(
        self, decision: Decision
    ) -> tuple[TierStream, dict[str, Any] | None] | None:
        errors: list[str] = []
        for tier in self.route.tiers[1:]:
            try:
                stream, first = await TierStream.open(
                    tier, self.endpoint, self.body, self.result, self.route.name
                )
            except UpstreamError as exc:
                errors.append(f"{tier.name}: {exc}")
                metrics.ESCALATION_ERRORS.labels(route=self.route.name, tier=tier.name).inc()
                continue
            self._open.append(stream)
            self.result.served_by, self.result.escalated = tier.name, True
            self.result.reason = decision.reason
            metrics.ESCALATIONS.labels(
                route=self.route.name, reason=decision.reason or "low_confidence", tier=tier.name
            ).inc()
            return stream, first
        self.result.reason = decision.reason
        self.result.escalation_error = "; ".join(errors)
        return None

    async def _drain(
        self, stream: TierStream, held: list[dict[str, Any] | None]
    ) -> AsyncGenerator[RoutedChunk, None]:
        for chunk in held:
            if chunk is not None:
                yield RoutedChunk(chunk, self.result)
        while True:
            chunk = await stream.next()
            if chunk is None:
                break
            yield RoutedChunk(chunk, self.result)
        self.result.confidence = decision_score(stream.final_scores())

"""`StreamRun`: one streaming request routed through its route's stream mode (stream_mode.py).

The rules are escalation.py's, with "asking a tier" meaning opening its stream and reading the
first chunk (tier_stream.py); what differs is when the decision can be made (the mode).

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

from calibserve.routing.agreement import answers_agree
from calibserve.routing.escalation import (
    escalate,
    first_answer,
    judge_primary,
    record_agreement,
)
from calibserve.routing.metrics import RoutingMetrics
from calibserve.routing.result import RoutedChunk, RoutedResult
from calibserve.routing.route import Route, Tier
from calibserve.routing.scoring import decision_score, least_confident
from calibserve.routing.stream_mode import OFF
from calibserve.routing.tier_stream import TierStream


class StreamRun:
    """One streaming request. Use `run()` once."""

    def __init__(
        self, route: Route, endpoint: str, body: dict[str, Any], metrics: RoutingMetrics
    ) -> None:
        self.route = route
        self.metrics = metrics
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
        (primary, first), _ = await first_answer(self.route, self._open_tier, result, self.metrics)
        if result.escalated or self.mode.kind == "off":
            # A fallback tier answering, or a mode that never escalates: stream it as it comes.
            async for item in self._drain(primary, [first]):
                yield item
            if not result.escalated:
                result.primary_confidence = result.confidence
            return

        held = [first]
        while not self._decidable(primary):
            chunk = await primary.next()
            if chunk is None:
                break
            held.append(chunk)
        least = least_confident(
            [primary.state(i).confidence() for i in range(self.n) if i in primary.choices]
        )
        stronger = None
        if judge_primary(self.route, least, result):
            stronger = await escalate(self.route, self._open_tier, result, self.metrics)
        if stronger is None:
            # Not escalating (or every stronger tier failed): the primary's answer, held part first.
            async for item in self._drain(primary, held):
                yield item
            return
        (other, other_first), _ = stronger
        primary_complete = primary.ended or primary.finished(0)
        await primary.aclose()  # abandons the primary's generation upstream
        async for item in self._drain(other, [other_first]):
            yield item
        record_agreement(self.metrics, result, answers_agree(
            primary.text(0), other.text(0), primary_complete=primary_complete
        ))

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

    async def _open_tier(self, tier: Tier) -> tuple[TierStream, dict[str, Any] | None]:
        """Asking a tier: start its stream and read the first chunk (failures to start surface
        here, while a fallback can still hide them from the client)."""
        stream, first = await TierStream.open(
            tier, self.endpoint, self.body, self.result, self.route.name, self.metrics
        )
        self._open.append(stream)
        return stream, first

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

"""`StreamRun`: one streaming request routed through its route's stream mode (stream_mode.py).

The rules are escalation.py's, with "asking a tier" meaning opening its stream and reading the
first chunk (tier_stream.py), and "reading its confidence" holding its chunks back until the mode
can decide (`_decidable`: all of them for `buffer`, N tokens of every choice for `prefix:N`).
Every judged tier is held and decided that way: the primary, and on a route of 3+ tiers each
middle tier that answers (by its own policy), before anything of it is sent.

What the client receives in every mode: the chunks of exactly one tier, each choice's finish
chunk carrying that tier's `confidence`, then (not sent) a final RoutedChunk with the result.
Fallback when the primary cannot start streaming works in every mode. A stronger tier that fails
before its first chunk leaves the client with the answer held before it (the primary's, or a
middle tier's) and `escalation_error`; one that fails after chunks were sent raises from the
iterator (nothing better can be done then). Routes that cannot escalate (one tier, or `never`)
always stream as `off`: holding the answer back would cost latency and could change nothing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from calibserve.routing.agreement import answers_agree
from calibserve.routing.escalation import (
    Walked,
    count_escalation,
    first_answer,
    record_served,
    walk,
)
from calibserve.routing.metrics import RoutingMetrics
from calibserve.routing.result import RoutedChunk, RoutedResult
from calibserve.routing.route import ConfidenceLike, Route, Tier
from calibserve.routing.scoring import decision_score, least_confident
from calibserve.routing.stream_mode import OFF
from calibserve.routing.tier_stream import TierStream


@dataclass
class Held:
    """A tier's open stream and the chunks read from it, not sent yet."""

    stream: TierStream
    chunks: list[dict[str, Any] | None] = field(default_factory=list)
    complete: bool = False  # when dropped: had its answer (choice 0) finished? (agreement)


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
        walked: Walked[Held]
        if self.mode.kind == "off":
            # A mode that never escalates: the first tier that answers, streamed as it comes.
            held, index = await first_answer(self.route, self._open_tier, result, self.metrics)
            count_escalation(self.metrics, result)
            walked = Walked(held, self.route.tiers[index], held if index == 0 else None)
        else:
            walked = await walk(self.route, self._open_tier, self._read, result, self.metrics,
                                drop=self._drop)
        served = walked.answer
        async for item in self._drain(served.stream, served.chunks):
            yield item
        record_served(self.metrics, result, walked, lambda primary, other: answers_agree(
            primary.stream.text(0), other.stream.text(0), primary_complete=primary.complete))

    async def _read(self, held: Held, tier: Tier) -> ConfidenceLike | None:
        """Hold the tier's chunks until the mode can decide; its least confident choice."""
        stream = held.stream
        while not self._decidable(stream):
            chunk = await stream.next()
            if chunk is None:
                break
            held.chunks.append(chunk)
        return least_confident(
            [stream.state(i).confidence() for i in range(self.n) if i in stream.choices])

    @staticmethod
    async def _drop(held: Held) -> None:
        """A stronger tier answers instead: close this one (abandons its generation upstream)."""
        held.complete = held.stream.ended or held.stream.finished(0)
        await held.stream.aclose()

    def _decidable(self, stream: TierStream) -> bool:
        """Enough of a tier's answer to decide on? buffer: all of it; prefix:N: N tokens."""
        if stream.ended:
            return True
        if self.mode.kind != "prefix":
            return False
        for i in range(self.n):
            if i not in stream.choices:
                return False
            state = stream.choices[i]
            if not state.finished and state.tokens < self.mode.prefix_tokens:
                return False
        return True

    async def _open_tier(self, tier: Tier) -> Held:
        """Asking a tier: start its stream and read the first chunk (failures to start surface
        here, while a fallback can still hide them from the client)."""
        stream, first = await TierStream.open(
            tier, self.endpoint, self.body, self.result, self.route.name, self.metrics
        )
        self._open.append(stream)
        return Held(stream, [first])

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

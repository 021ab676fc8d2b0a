"""One tier's SSE stream, scored as it goes.

Feeds each choice's logprobs to the tier's streaming scorer, attaches `confidence` to the chunk
that carries a choice's `finish_reason`, keeps each choice's text (for agreement) and token count
(for `prefix:N`), renames `model` to the route, and times every wait on the upstream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from calibserve.routing.errors import UpstreamError
from calibserve.routing.payload import endpoint_path, tier_body
from calibserve.routing.result import RoutedResult
from calibserve.routing.route import ConfidenceLike, StreamScorer, Tier
from calibserve.routing.scoring import confidence_dict


@dataclass
class ChoiceState:
    scorer: StreamScorer
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    final: ConfidenceLike | None = None

    @property
    def finished(self) -> bool:
        return self.final is not None

    def score(self) -> float:
        conf = self.final if self.final is not None else self.scorer.confidence()
        return float(conf.score)


class TierStream:
    """Iterate with `await next()` (None at the end); always `await aclose()`."""

    def __init__(
        self,
        tier: Tier,
        chunks: AsyncIterator[dict[str, Any]],
        result: RoutedResult,
        route_name: str,
    ) -> None:
        self.tier = tier
        self._chunks = chunks
        self._result = result
        self._route_name = route_name
        self.choices: dict[int, ChoiceState] = {}
        self.ended = False

    @classmethod
    async def open(
        cls, tier: Tier, endpoint: str, body: dict[str, Any], result: RoutedResult, route: str
    ) -> tuple[TierStream, dict[str, Any] | None]:
        """Start the tier's stream and read its first chunk, so that failures to start (the
        ones a fallback can still hide from the client) surface here."""
        result.tiers_tried.append(tier.name)
        payload = tier_body(endpoint, body, tier.model, stream=True)
        chunks = tier.upstream.stream(endpoint_path(endpoint), payload)
        stream = cls(tier, chunks, result, route)
        try:
            first = await stream.next()
        except BaseException:
            await stream.aclose()
            raise
        return stream, first

    async def next(self) -> dict[str, Any] | None:
        if self.ended:
            return None
        started = time.perf_counter()
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            self.ended = True
            return None
        except UpstreamError:
            self.ended = True
            raise
        finally:
            self._result.upstream_seconds += time.perf_counter() - started
        self._observe(chunk)
        return chunk

    async def aclose(self) -> None:
        self.ended = True
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    def state(self, index: int) -> ChoiceState:
        if index not in self.choices:
            self.choices[index] = ChoiceState(self.tier.confidence_scorer.stream())
        return self.choices[index]

    def text(self, index: int = 0) -> str:
        return "".join(self.choices[index].text) if index in self.choices else ""

    def finished(self, index: int = 0) -> bool:
        return index in self.choices and self.choices[index].finished

    def final_scores(self) -> list[float]:
        return [s.score() for _, s in sorted(self.choices.items())]

    def _observe(self, chunk: dict[str, Any]) -> None:
        if "model" in chunk:
            chunk["model"] = self._route_name
        for choice in chunk.get("choices") or []:
            state = self.state(int(choice.get("index", 0)))
            logprobs = choice.get("logprobs")
            if logprobs:
                state.scorer.feed(logprobs)
            state.tokens += _token_count(choice, logprobs)
            text = _delta_text(choice)
            if text:
                state.text.append(text)
            if choice.get("finish_reason") is not None and state.final is None:
                state.final = state.scorer.confidence()
                choice["confidence"] = confidence_dict(state.final)


def _delta_text(choice: dict[str, Any]) -> str:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return str(delta.get("content") or "")
    return str(choice.get("text") or "")


def _token_count(choice: dict[str, Any], logprobs: Any) -> int:
    if isinstance(logprobs, dict):
        if isinstance(logprobs.get("content"), list):
            return len(logprobs["content"])
        if isinstance(logprobs.get("tokens"), list):
            return len(logprobs["tokens"])
    # No logprobs (an upstream that ignores the request): count a chunk with text as one token.
    return 1 if _delta_text(choice) else 0

"""One tier's SSE stream, scored as it goes.

Feeds each choice's logprobs to the tier's streaming scorer, attaches `confidence` to the chunk
that carries a choice's `finish_reason`, keeps each choice's text (for agreement) and token count
(for `prefix:N`), renames `model` to the route, and times every wait on the upstream.
A choice whose method needs extra upstream work (`verify`, `consistency`: confidence_work.py)
has its finish chunk held until that work is done, so the chunk the client gets carries the
final confidence; the work is the same `ConfidenceWork` the non-streaming path uses.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from calibserve.calibration.confidence import confidence_json
from calibserve.routing.client_view import tier_body
from calibserve.routing.confidence_work import ConfidenceWork
from calibserve.routing.errors import UpstreamError
from calibserve.routing.metrics import RoutingMetrics
from calibserve.routing.payload import endpoint_path, tier_top_logprobs, verify_reads_ids
from calibserve.routing.result import RoutedResult
from calibserve.routing.route import ConfidenceLike, StreamScorer, Tier
from calibserve.routing.verify_tokens import ReplyIds, reply_ids


@dataclass
class ChoiceState:
    scorer: StreamScorer
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    final: ConfidenceLike | None = None
    # The reply as one choice of a whole answer, for `reply_ids` (verify's prompt on ids):
    # its token ids (each chunk's delta), its prompt's (completions), how it finished.
    ids: dict[str, Any] = field(default_factory=lambda: {"token_ids": [], "message": {}})

    @property
    def finished(self) -> bool:
        return self.final is not None

    def confidence(self) -> ConfidenceLike:
        return self.final if self.final is not None else self.scorer.confidence()

    def score(self) -> float:
        return float(self.confidence().score)


class TierStream:
    """Iterate with `await next()` (None at the end); always `await aclose()`."""

    def __init__(
        self,
        tier: Tier,
        chunks: AsyncIterator[dict[str, Any]],
        result: RoutedResult,
        route_name: str,
        work: ConfidenceWork | None = None,
        endpoint: str = "chat",
    ) -> None:
        self.tier = tier
        self._work = work
        self._endpoint = endpoint
        self._prompt_ids: Any = None  # chat: the first chunk's `prompt_token_ids`
        self._chunks = chunks
        self._result = result
        self._route_name = route_name
        self.choices: dict[int, ChoiceState] = {}
        self.ended = False

    @classmethod
    async def open(
        cls, tier: Tier, endpoint: str, body: dict[str, Any], result: RoutedResult, route: str,
        metrics: RoutingMetrics,
    ) -> tuple[TierStream, dict[str, Any] | None]:
        """Start the tier's stream and read its first chunk, so that failures to start (the
        ones a fallback can still hide from the client) surface here."""
        result.tiers_tried.append(tier.name)
        work = ConfidenceWork(tier, endpoint, body, result, metrics)
        scorer, offered = tier.confidence_scorer, work.options_offered
        payload = tier_body(endpoint, body, tier.model, stream=True,
                            top_logprobs=tier_top_logprobs(scorer, offered),
                            token_ids=verify_reads_ids(scorer, endpoint, body, offered))
        chunks = tier.upstream.stream(endpoint_path(endpoint), payload)
        stream = cls(tier, chunks, result, route, work, endpoint)
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
        pending = self._observe(chunk)
        if pending and self._work is not None:
            await self._refine(pending)
        return chunk

    async def _refine(self, pending: list[tuple[dict[str, Any], ChoiceState]]) -> None:
        """The extra work of the choices this chunk finishes, before the chunk goes out."""
        assert self._work is not None
        finals = await self._work.refine_all(
            [(state.confidence(), "".join(state.text), state.text) for _, state in pending],
            [self._reply_ids(state) for _, state in pending],
        )
        for (choice, state), conf in zip(pending, finals, strict=True):
            state.final = conf
            choice["confidence"] = confidence_json(conf)

    def _reply_ids(self, state: ChoiceState) -> ReplyIds | None:
        return reply_ids(self._endpoint, {"prompt_token_ids": self._prompt_ids}, state.ids)

    async def aclose(self) -> None:
        self.ended = True
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    def state(self, index: int) -> ChoiceState:
        if index not in self.choices:
            offered = None if self._work is None else self._work.options_offered
            self.choices[index] = ChoiceState(self.tier.confidence_scorer.stream(offered))
        return self.choices[index]

    def text(self, index: int = 0) -> str:
        return "".join(self.choices[index].text) if index in self.choices else ""

    def finished(self, index: int = 0) -> bool:
        return index in self.choices and self.choices[index].finished

    def final_scores(self) -> list[float]:
        return [s.score() for _, s in sorted(self.choices.items())]

    def _observe(self, chunk: dict[str, Any]) -> list[tuple[dict[str, Any], ChoiceState]]:
        """Score the chunk; the (choice, state) pairs it finished that still need extra work."""
        pending: list[tuple[dict[str, Any], ChoiceState]] = []
        if "model" in chunk:
            chunk["model"] = self._route_name
        if chunk.get("prompt_token_ids") is not None:
            self._prompt_ids = chunk["prompt_token_ids"]
        for choice in chunk.get("choices") or []:
            state = self.state(int(choice.get("index", 0)))
            _keep_ids(state.ids, choice)
            logprobs = choice.get("logprobs")
            if logprobs:
                state.scorer.feed(logprobs)
            state.tokens += _token_count(choice, logprobs)
            text = _delta_text(choice)
            if text:
                state.text.append(text)
            if choice.get("finish_reason") is not None and state.final is None:
                state.final = state.scorer.confidence()
                choice["confidence"] = confidence_json(state.final)
                if self._work is not None and self._work.pending(state.final):
                    pending.append((choice, state))
        return pending


def _keep_ids(ids: dict[str, Any], choice: dict[str, Any]) -> None:
    """Add a streamed choice's token ids (and how it finished) to the reply's."""
    delta, kept = choice.get("token_ids"), ids["token_ids"]
    if isinstance(delta, list) and kept is not None:
        kept.extend(delta)
    elif delta is not None:
        ids["token_ids"] = None  # not ids: never a verify prompt on them
    if choice.get("prompt_token_ids") is not None:
        ids["prompt_token_ids"] = choice["prompt_token_ids"]
    message = choice.get("delta")
    if isinstance(message, dict):
        for key in ("tool_calls", "reasoning_content", "reasoning"):
            if message.get(key):
                ids["message"][key] = True
    if choice.get("finish_reason") is not None:
        ids["finish_reason"] = choice["finish_reason"]
        ids["stop_reason"] = choice.get("stop_reason")


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

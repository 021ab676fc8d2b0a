"""The router: which tier answers a request, and what the client learns about it.

Non-streaming (`complete`):
1. Ask tiers in order until one answers; if the primary is down (connect error, circuit open,
   timeout, 5xx after retries) the next tier answers with reason `primary_failed`. A 4xx from the
   primary is the request's fault and goes back to the client unchanged (UpstreamClientError).
2. Attach each choice's calibrated confidence (the answering tier's scorer) and ask the route's
   policy about the least confident choice (scoring.decision_score).
3. If it says escalate, ask the stronger tiers in order; the first that answers is served. If all
   fail, the client still gets the primary's answer, with `escalation_error`.
The policy only ever judges the primary: a stronger tier's answer is served as is.
Streaming (`stream`) follows the same rules through the route's stream mode (streaming.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import aclosing
from typing import Any

from calibserve.routing import metrics
from calibserve.routing.agreement import answers_agree, choice_text
from calibserve.routing.errors import UpstreamClientError, UpstreamError
from calibserve.routing.payload import endpoint_path, tier_body
from calibserve.routing.result import RoutedChunk, RoutedResult
from calibserve.routing.route import Route, Tier
from calibserve.routing.scoring import attach_confidences, decision_score
from calibserve.routing.streaming import StreamRun


class Router:
    """Routes requests; holds the routes by name (optional) and no per-request state."""

    def __init__(self, routes: Iterable[Route] | Mapping[str, Route] | None = None) -> None:
        items = routes.values() if isinstance(routes, Mapping) else (routes or [])
        self.routes: dict[str, Route] = {r.name: r for r in items}

    def route(self, route: Route | str) -> Route:
        if isinstance(route, Route):
            return route
        return self.routes[route]

    async def aclose(self) -> None:
        """Close every upstream of every known route."""
        seen: set[int] = set()
        for r in self.routes.values():
            for tier in r.tiers:
                if id(tier.upstream) not in seen:
                    seen.add(id(tier.upstream))
                    await tier.upstream.aclose()

    async def complete(
        self, route: Route | str, endpoint: str, body: dict[str, Any]
    ) -> RoutedResult:
        """Route a non-streaming request. Raises UpstreamError only when no tier could answer."""
        r = self.route(route)
        endpoint_path(endpoint)  # validate early
        metrics.ROUTE_REQUESTS.labels(route=r.name).inc()
        result = RoutedResult(route=r.name)

        answer, index = await self._first_answer(r, endpoint, body, result)
        tier = r.tiers[index]
        scores = attach_confidences(answer, tier.confidence_scorer)
        result.body, result.served_by = answer, tier.name
        result.confidence = decision_score(scores)
        if index > 0:
            result.escalated, result.reason = True, "primary_failed"
            metrics.ESCALATIONS.labels(route=r.name, reason="primary_failed", tier=tier.name).inc()
            return result

        result.primary_confidence = result.confidence
        decision = r.policy.decide(_score_for_policy(result.primary_confidence))
        result.threshold = decision.threshold
        if not decision.escalate or len(r.tiers) < 2:
            return result
        result.reason = decision.reason
        errors: list[str] = []
        for stronger in r.tiers[1:]:
            try:
                other = await self._call(stronger, endpoint, body, result, r.name)
            except UpstreamError as exc:
                errors.append(f"{stronger.name}: {exc}")
                metrics.ESCALATION_ERRORS.labels(route=r.name, tier=stronger.name).inc()
                continue
            other_scores = attach_confidences(other, stronger.confidence_scorer)
            result.agreement = _agree(answer, other)
            result.body, result.served_by, result.escalated = other, stronger.name, True
            result.confidence = decision_score(other_scores)
            metrics.ESCALATIONS.labels(
                route=r.name, reason=decision.reason or "low_confidence", tier=stronger.name
            ).inc()
            if result.agreement is not None:
                metrics.AGREEMENT.labels(
                    route=r.name, agreed=str(result.agreement).lower()
                ).inc()
            return result
        result.escalation_error = "; ".join(errors)
        return result

    async def stream(
        self, route: Route | str, endpoint: str, body: dict[str, Any]
    ) -> AsyncGenerator[RoutedChunk, None]:
        """Route a streaming request; see streaming.py for what each mode yields.

        Raises UpstreamError before the first item when no tier could start; an error after
        chunks were sent propagates from the iterator (the server ends the stream with an error).
        """
        r = self.route(route)
        endpoint_path(endpoint)
        metrics.ROUTE_REQUESTS.labels(route=r.name).inc()
        async with aclosing(StreamRun(r, endpoint, body).run()) as items:
            async for item in items:
                yield item

    async def _first_answer(
        self, route: Route, endpoint: str, body: dict[str, Any], result: RoutedResult
    ) -> tuple[dict[str, Any], int]:
        first_error: UpstreamError | None = None
        for index, tier in enumerate(route.tiers):
            try:
                return await self._call(tier, endpoint, body, result, route.name), index
            except UpstreamClientError:
                if index == 0:
                    raise
                # A fallback tier rejecting the request does not make it the client's fault.
                continue
            except UpstreamError as exc:
                if first_error is None:
                    first_error = exc
                    result.primary_error = str(exc)
        assert first_error is not None
        raise first_error

    async def _call(
        self, tier: Tier, endpoint: str, body: dict[str, Any], result: RoutedResult, route: str
    ) -> dict[str, Any]:
        result.tiers_tried.append(tier.name)
        payload = tier_body(endpoint, body, tier.model, stream=False)
        started = time.perf_counter()
        try:
            answer = await tier.upstream.request_json(endpoint_path(endpoint), payload)
        finally:
            result.upstream_seconds += time.perf_counter() - started
        if "model" in answer:
            answer["model"] = route
        return answer


def _score_for_policy(score: float | None) -> float:
    # No choices at all means nothing to trust: report 0 so a threshold escalates.
    return 0.0 if score is None else score


def _agree(primary: dict[str, Any], other: dict[str, Any]) -> bool | None:
    a, b = primary.get("choices") or [], other.get("choices") or []
    if not a or not b:
        return None
    return answers_agree(choice_text(a[0]), choice_text(b[0]))

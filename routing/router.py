"""The router: which tier answers a request, and what the client learns about it.

Non-streaming (`complete`) follows the rules of escalation.py with "asking a tier" meaning one
JSON request: the first tier that answers (fallback `primary_failed`), each choice's calibrated
confidence attached (the answering tier's scorer), the tier's policy asked about the least
confident choice (scoring.decision_score), stronger tiers tried in order when it says so. The
route's policy judges the primary; on a route of 3+ tiers each middle tier's own policy judges
its answer; the last tier's answer is served as is.
Streaming (`stream`) follows the same rules through the route's stream mode (stream_run.py).
Both record on the router's RoutingMetrics (metrics.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import aclosing
from typing import Any

from calibserve.routing.agreement import answers_agree, choice_text
from calibserve.routing.client_view import tier_body
from calibserve.routing.confidence_work import ConfidenceWork
from calibserve.routing.escalation import record_served, walk
from calibserve.routing.metrics import RoutingMetrics, default_metrics
from calibserve.routing.payload import endpoint_path, tier_top_logprobs, verify_reads_ids
from calibserve.routing.result import RoutedChunk, RoutedResult
from calibserve.routing.route import ConfidenceLike, Route, Tier
from calibserve.routing.scoring import least_confident, score_answer
from calibserve.routing.stream_run import StreamRun


class Router:
    """Routes requests; holds the routes by name (optional), its metrics, no per-request state."""

    def __init__(
        self,
        routes: Iterable[Route] | Mapping[str, Route] | None = None,
        *,
        metrics: RoutingMetrics | None = None,
    ) -> None:
        items = routes.values() if isinstance(routes, Mapping) else (routes or [])
        self.routes: dict[str, Route] = {r.name: r for r in items}
        self.metrics = metrics if metrics is not None else default_metrics()

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
        self.metrics.routed(r.name)
        result = RoutedResult(route=r.name)

        works: dict[int, ConfidenceWork] = {}  # per tier: read the prompt once

        def work_for(tier: Tier) -> ConfidenceWork:
            if id(tier) not in works:
                works[id(tier)] = ConfidenceWork(tier, endpoint, body, result, self.metrics)
            return works[id(tier)]

        async def ask(tier: Tier) -> dict[str, Any]:
            return await _ask(tier, endpoint, body, result, work_for(tier).options_offered)

        least: dict[str, ConfidenceLike | None] = {}  # per tier (each answers at most once)

        async def scored(answer: dict[str, Any], tier: Tier) -> ConfidenceLike | None:
            """Score the answer's choices once (confidence attached); the least confident."""
            if tier.name not in least:
                least[tier.name] = least_confident(await score_answer(answer, work_for(tier)))
            return least[tier.name]

        walked = await walk(r, ask, scored, result, self.metrics)
        result.body = walked.answer
        served = await scored(walked.answer, walked.tier)
        result.confidence = None if served is None else float(served.score)
        record_served(self.metrics, result, walked, _agree)
        return result

    async def stream(
        self, route: Route | str, endpoint: str, body: dict[str, Any]
    ) -> AsyncGenerator[RoutedChunk, None]:
        """Route a streaming request; see stream_run.py for what each mode yields.

        Raises UpstreamError before the first item when no tier could start; an error after
        chunks were sent propagates from the iterator (the server ends the stream with an error).
        """
        r = self.route(route)
        endpoint_path(endpoint)
        self.metrics.routed(r.name)
        async with aclosing(StreamRun(r, endpoint, body, self.metrics).run()) as items:
            async for item in items:
                yield item


async def _ask(
    tier: Tier, endpoint: str, body: dict[str, Any], result: RoutedResult,
    offered: bool | None,
) -> dict[str, Any]:
    """One tier's JSON answer, `model` renamed to the route, time spent waiting recorded;
    `offered`: does the prompt offer lettered options (what the engine is asked for)."""
    result.tiers_tried.append(tier.name)
    scorer = tier.confidence_scorer
    top = tier_top_logprobs(scorer, offered)
    payload = tier_body(endpoint, body, tier.model, stream=False, top_logprobs=top,
                        token_ids=verify_reads_ids(scorer, endpoint, body, offered))
    started = time.perf_counter()
    try:
        answer = await tier.upstream.request_json(endpoint_path(endpoint), payload)
    finally:
        result.upstream_seconds += time.perf_counter() - started
    if "model" in answer:
        answer["model"] = result.route
    return answer


def _agree(primary: dict[str, Any], other: dict[str, Any]) -> bool | None:
    a, b = primary.get("choices") or [], other.get("choices") or []
    if not a or not b:
        return None
    return answers_agree(choice_text(a[0]), choice_text(b[0]))

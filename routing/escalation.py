"""The escalation rules both router paths share, and the one place their outcomes are counted.

`Router.complete` (a JSON answer per tier) and `StreamRun` (an open stream per tier) differ only
in what asking a tier means; that is the `ask` callable each passes in. The rules:
1. `first_answer`: the primary, else the next tier that answers (reason `primary_failed`). A 4xx
   from the primary is the request's fault and goes back to the client (UpstreamClientError); a
   fallback tier rejecting the request does not make it the client's fault, so it is skipped.
   A primary that fails otherwise (unreachable, timeout, or a 5xx it answered: the engine failed,
   not the request) falls back like that too; when no tier answers, the primary's error is
   raised, carrying the engine's own answer if it gave one (the server passes it through).
2. `judge_primary`: the route's policy decides on the primary's (least confident) score.
3. `escalate`: ask the stronger tiers in order; the first that answers is served. If all fail,
   the client keeps the primary's answer, with `escalation_error`.
`record_escalation` and `record_agreement` are the only code that counts escalations and
agreement; `escalate` the only code that counts escalation errors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from calibserve.routing.errors import UpstreamClientError, UpstreamError
from calibserve.routing.metrics import RoutingMetrics
from calibserve.routing.policy import Decision
from calibserve.routing.result import RoutedResult
from calibserve.routing.route import ConfidenceLike, Route, Tier

T = TypeVar("T")
Ask = Callable[[Tier], Awaitable[T]]


async def first_answer(
    route: Route, ask: Ask[T], result: RoutedResult, metrics: RoutingMetrics
) -> tuple[T, Tier]:
    """The first tier's answer, primary first; raises the primary's error when none answers."""
    first_error: UpstreamError | None = None
    for index, tier in enumerate(route.tiers):
        try:
            answer = await ask(tier)
        except UpstreamClientError:
            if index == 0:
                raise
            continue
        except UpstreamError as exc:
            if first_error is None:
                first_error = exc
                result.primary_error = str(exc)
            continue
        result.served_by = tier.name
        if index > 0:
            record_escalation(metrics, result, tier, "primary_failed")
        return answer, tier
    assert first_error is not None
    raise first_error


def judge_primary(route: Route, conf: ConfidenceLike | None, result: RoutedResult) -> bool:
    """Ask the policy about the primary's least confident choice (None: no choices, judged as
    0): should a stronger tier answer? The policy sees the score, the method that scored it and
    whether it is calibrated (per-method thresholds, the `uncalibrated` setting). Records the
    score and threshold, and the reason when it should."""
    score = None if conf is None else float(conf.score)
    result.primary_confidence = score
    if conf is None:
        decision: Decision = route.policy.decide(0.0)
    else:
        decision = route.policy.decide(score or 0.0, str(conf.method),
                                       bool(getattr(conf, "calibrated", False)))
    result.threshold = decision.threshold
    if not decision.escalate or len(route.tiers) < 2:
        return False
    result.reason = decision.reason
    return True


async def escalate(
    route: Route, ask: Ask[T], result: RoutedResult, metrics: RoutingMetrics
) -> tuple[T, Tier] | None:
    """The first stronger tier's answer after `judge_primary` said so; None when all failed."""
    errors: list[str] = []
    for tier in route.tiers[1:]:
        try:
            answer = await ask(tier)
        except UpstreamError as exc:
            errors.append(f"{tier.name}: {exc}")
            metrics.escalation_failed(route.name, tier.name)
            continue
        record_escalation(metrics, result, tier, result.reason)
        return answer, tier
    result.escalation_error = "; ".join(errors)
    return None


def record_escalation(
    metrics: RoutingMetrics, result: RoutedResult, tier: Tier, reason: str | None
) -> None:
    """`tier` (not the primary) answers, for `reason`: the result says so and it is counted."""
    result.served_by, result.escalated, result.reason = tier.name, True, reason
    metrics.escalated(result.route, reason or "low_confidence", tier.name)


def record_agreement(metrics: RoutingMetrics, result: RoutedResult, agreed: bool | None) -> None:
    """Did the primary agree with the stronger tier's answer? None: nothing to compare."""
    result.agreement = agreed
    if agreed is not None:
        metrics.agreed(result.route, agreed)

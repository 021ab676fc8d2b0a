"""The escalation rules both router paths share, and the one place their outcomes are counted.

`Router.complete` (a JSON answer per tier) and `StreamRun` (an open stream per tier) differ only
in what asking a tier means, what reading an answer's confidence means, and whether an answer
left behind must be closed; those are the `ask`, `read` and `drop` callables each passes to
`walk`. The rules:
1. `first_answer`: the primary, else the next tier that answers (reason `primary_failed`). A 4xx
   from the primary is the request's fault and goes back to the client (UpstreamClientError); a
   fallback tier rejecting the request does not make it the client's fault, so it is skipped.
   A primary that fails otherwise (unreachable, timeout, or a 5xx it answered: the engine failed,
   not the request) falls back like that too; when no tier answers, the primary's error is
   raised, carrying the engine's own answer if it gave one (the server passes it through).
2. `judge`: the answering tier's policy (`Route.policy_for`: the route's for the primary, a
   middle tier's own on a route of 3+ tiers, none for the last) decides on its (least
   confident) score whether a stronger tier should answer.
3. `escalate`: ask the tiers after it in order; the first that answers replaces the answer, and
   is judged in turn by rule 2 (so in primary -> middle -> expert, the middle's answer is served
   only when its own threshold keeps it). If all fail, the client keeps the answer it had (the
   primary's, or the middle tier's), with `escalation_error`.
`count_escalation` (once per request) and `record_agreement` are the only code that counts
escalations and agreement; `escalate` the only code that counts escalation errors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from calibserve.routing.errors import UpstreamClientError, UpstreamError
from calibserve.routing.metrics import RoutingMetrics
from calibserve.routing.result import RoutedResult
from calibserve.routing.route import ConfidenceLike, Route, Tier

T = TypeVar("T")
Ask = Callable[[Tier], Awaitable[T]]
# An answer's (least confident choice's) confidence as the policy should see it; None: no choices.
Read = Callable[[T, Tier], Awaitable[ConfidenceLike | None]]
# An answer given up for a stronger tier's (a stream: closed, abandoning its generation).
Drop = Callable[[T], Awaitable[None]]


@dataclass
class Walked(Generic[T]):
    """Where `walk` ended: the answer to serve, its tier, and the primary's answer when the
    primary answered (None: it failed), for agreement."""

    answer: T
    tier: Tier
    primary: T | None


async def walk(
    route: Route, ask: Ask[T], read: Read[T], result: RoutedResult, metrics: RoutingMetrics,
    drop: Drop[T] | None = None,
) -> Walked[T]:
    """The rules above: the first answer, then while its tier's policy sends it on and a
    stronger tier answers, that tier's answer. `read` is called only on answers a policy
    judges (a stream holds its answer back only then)."""
    answer, index = await first_answer(route, ask, result, metrics)
    primary = answer if index == 0 else None
    while route.policy_for(index) is not None:
        if not judge(route, index, await read(answer, route.tiers[index]), result):
            break
        stronger = await escalate(route, ask, result, metrics, after=index)
        if stronger is None:
            break
        if drop is not None:
            await drop(answer)
        answer, index = stronger
    count_escalation(metrics, result)
    return Walked(answer, route.tiers[index], primary)


async def first_answer(
    route: Route, ask: Ask[T], result: RoutedResult, metrics: RoutingMetrics
) -> tuple[T, int]:
    """The first tier's answer and its index, primary first; raises the primary's error when
    none answers."""
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
            record_escalation(result, tier, "primary_failed")
        return answer, index
    assert first_error is not None
    raise first_error


def judge(route: Route, index: int, conf: ConfidenceLike | None, result: RoutedResult) -> bool:
    """Ask tier `index`'s policy about its least confident choice (None: no choices, judged as
    0): should a stronger tier answer? The policy sees the score, the method that scored it and
    whether it is calibrated (per-method thresholds, the `uncalibrated` setting). Records the
    judgment (the primary's score and threshold in their own fields too), and the reason when
    it should."""
    policy = route.policy_for(index)
    score = None if conf is None else float(conf.score)
    if index == 0:
        result.primary_confidence = score
    if policy is None:
        return False
    if conf is None:
        decision = policy.decide(0.0)
    else:
        decision = policy.decide(score or 0.0, str(conf.method),
                                 bool(getattr(conf, "calibrated", False)))
    if index == 0:
        result.threshold = decision.threshold
    result.judgments.append({"tier": route.tiers[index].name, "confidence": score,
                             "threshold": decision.threshold, "escalate": decision.escalate})
    if not decision.escalate:
        return False
    result.reason = decision.reason
    return True


async def escalate(
    route: Route, ask: Ask[T], result: RoutedResult, metrics: RoutingMetrics, after: int = 0
) -> tuple[T, int] | None:
    """The first answer of a tier after `after` (and its index), once `judge` said so; None
    when all failed (`escalation_error` says why)."""
    errors: list[str] = []
    for index in range(after + 1, len(route.tiers)):
        tier = route.tiers[index]
        try:
            answer = await ask(tier)
        except UpstreamError as exc:
            errors.append(f"{tier.name}: {exc}")
            metrics.escalation_failed(route.name, tier.name)
            continue
        record_escalation(result, tier, result.reason)
        return answer, index
    result.escalation_error = "; ".join(errors)
    return None


def record_escalation(result: RoutedResult, tier: Tier, reason: str | None) -> None:
    """`tier` (not the primary) answers, for `reason`: the result says so (each hop; the last
    one stands)."""
    result.served_by, result.escalated, result.reason = tier.name, True, reason


def count_escalation(metrics: RoutingMetrics, result: RoutedResult) -> None:
    """Once per request, when its route is decided: an answer from a stronger tier is counted
    under the tier that answered and the last reason (primary -> middle -> expert counts once,
    as the expert's), so escalations / requests is the share of requests escalated."""
    if result.escalated and result.served_by:
        metrics.escalated(result.route, result.reason or "low_confidence", result.served_by)


def record_served(
    metrics: RoutingMetrics, result: RoutedResult, walked: Walked[T],
    agree: Callable[[T, T], bool | None],
) -> None:
    """Once the served answer is complete (`result.confidence` set): a primary served unjudged
    reports its served confidence as `primary_confidence`; a stronger tier's answer that
    replaced the primary's is compared with it (`agree(primary, served)`)."""
    if walked.primary is None:
        return
    if walked.primary is walked.answer:
        if result.primary_confidence is None:
            result.primary_confidence = result.confidence
        return
    record_agreement(metrics, result, agree(walked.primary, walked.answer))


def record_agreement(metrics: RoutingMetrics, result: RoutedResult, agreed: bool | None) -> None:
    """Did the primary agree with the stronger tier's answer? None: nothing to compare."""
    result.agreement = agreed
    if agreed is not None:
        metrics.agreed(result.route, agreed)

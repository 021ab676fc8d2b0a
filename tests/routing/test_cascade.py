"""Routes of three tiers (primary -> middle -> expert): every tier but the last is judged by its
own policy, on both router paths, with scripted FAKE upstreams.

The route's policy judges the primary (threshold 0.5); the middle tier's own policy (threshold
0.8) judges the middle's answer; the expert's answer is served as is.
"""

from __future__ import annotations

import httpx
import pytest

from calibserve.calibration import Scorer
from calibserve.routing import (
    BudgetPolicy,
    NeverPolicy,
    Policy,
    RetryPolicy,
    Route,
    Router,
    RoutingMetrics,
    ThresholdPolicy,
    Tier,
    Upstream,
)
from calibserve.testing.scripted import ScriptedUpstream, SlowStream, fake_chat_events, ok

pytestmark = pytest.mark.anyio
CHAT = {"model": "r", "messages": [{"role": "user", "content": "q"}]}
PRIMARY, MIDDLE = ThresholdPolicy(0.5), ThresholdPolicy(0.8)


class Cascade:
    """A primary -> middle -> expert route over three scripted fakes, on metrics of its own."""

    def __init__(self, primary: list, middle: list, expert: list, *,
                 middle_policy: Policy | None = MIDDLE, mode: str = "buffer") -> None:
        self.metrics = RoutingMetrics()
        self.fakes = {"p": ScriptedUpstream(primary), "m": ScriptedUpstream(middle),
                      "e": ScriptedUpstream(expert)}
        tiers = [Tier(name, Upstream(f"{name}-up", "http://fake", retry=RetryPolicy(
            max_attempts=1), transport=fake.transport(), metrics=self.metrics),
            Scorer.from_config(None), policy=middle_policy if name == "m" else None)
            for name, fake in self.fakes.items()]
        self.route = Route("cascade", tiers, PRIMARY, stream_mode=mode)
        self.router = Router([self.route], metrics=self.metrics)

    def asked(self, name: str) -> int:
        return len(self.fakes[name].requests)

    def count(self, metric: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(metric, {"route": "cascade", **labels})
        return value or 0.0

    def escalations(self, reason: str, tier: str) -> float:
        return self.count("calibserve_escalations_total", reason=reason, tier=tier)

    def errors(self, tier: str) -> float:
        return self.count("calibserve_escalation_errors_total", tier=tier)

    async def complete(self):
        return await self.router.complete("cascade", "chat", dict(CHAT))

    async def stream(self, on_first=None):
        """The texts the client got and the result; `on_first()` runs when the first item
        reaches the client."""
        items = []
        async for item in self.router.stream("cascade", "chat", dict(CHAT, stream=True)):
            if not items and on_first is not None:
                on_first()
            items.append(item)
        texts = [c["choices"][0]["delta"].get("content") for i in items if (c := i.data)]
        return texts, items[-1].result


def judgment(tier: str, confidence: float, threshold: float, escalate: bool) -> dict:
    return {"tier": tier, "confidence": pytest.approx(confidence), "threshold": threshold,
            "escalate": escalate}


def streaming(text: str, prob: float, closed: list[SlowStream] | None = None):
    def answer(request: httpx.Request) -> httpx.Response:
        body = SlowStream(fake_chat_events([(text, prob)]))
        if closed is not None:
            closed.append(body)
        return httpx.Response(200, stream=body)
    return answer


def test_policy_for_is_the_routes_for_the_primary_the_tiers_own_else_none() -> None:
    c = Cascade([ok()], [ok()], [ok()])
    assert c.route.policy_for(0) is PRIMARY and c.route.policy_for(1) is MIDDLE
    assert c.route.policy_for(2) is None  # the last tier: nothing stronger to ask
    assert Cascade([ok()], [ok()], [ok()], middle_policy=None).route.policy_for(1) is None
    never = Route("n", c.route.tiers, NeverPolicy())
    assert never.policy_for(0) is None and never.can_escalate  # the middle is still judged
    assert not Route("one", c.route.tiers[:1], PRIMARY).can_escalate


# --- JSON answers (Router.complete) ------------------------------------------------------------

async def test_a_confident_middle_is_served_and_the_expert_never_asked() -> None:
    c = Cascade([ok("B", 0.3)], [ok("C", 0.9)], [ok("D", 0.99)])
    res = await c.complete()
    assert res.served_by == "m" and res.escalated and res.reason == "low_confidence"
    assert res.body["choices"][0]["message"]["content"] == "C"
    assert res.confidence == pytest.approx(0.9) and res.agreement is False
    # The primary's fields keep meaning the primary's; each judged tier is listed.
    assert res.primary_confidence == pytest.approx(0.3) and res.threshold == 0.5
    assert res.judgments == [judgment("p", 0.3, 0.5, True), judgment("m", 0.9, 0.8, False)]
    assert res.calibserve()["judgments"] == res.judgments
    assert c.asked("e") == 0 and res.tiers_tried == ["p", "m"]
    assert c.escalations("low_confidence", "m") == 1 and c.escalations("low_confidence", "e") == 0


async def test_an_unconfident_middle_escalates_to_the_expert_counted_once() -> None:
    c = Cascade([ok("B", 0.3)], [ok("C", 0.6)], [ok("B", 0.99)])
    res = await c.complete()
    assert res.served_by == "e" and res.escalated and res.reason == "low_confidence"
    assert res.body["choices"][0]["message"]["content"] == "B"
    assert res.judgments == [judgment("p", 0.3, 0.5, True), judgment("m", 0.6, 0.8, True)]
    assert res.primary_confidence == pytest.approx(0.3) and res.threshold == 0.5
    assert res.confidence == pytest.approx(0.99) and res.escalation_error is None
    assert res.agreement is True  # the primary against the answer served (the expert's)
    # One escalated request: counted once, under the tier that answered (escalations / requests
    # stays the share of requests escalated).
    assert c.escalations("low_confidence", "m") == 0 and c.escalations("low_confidence", "e") == 1
    assert c.count("calibserve_escalation_agreement_total", agreed="true") == 1


async def test_a_confident_primary_asks_neither() -> None:
    c = Cascade([ok("B", 0.7)], [ok("C", 0.9)], [ok("D", 0.99)])
    res = await c.complete()
    assert res.served_by == "p" and not res.escalated and res.reason is None
    assert res.judgments == [judgment("p", 0.7, 0.5, False)]
    assert c.asked("m") == c.asked("e") == 0


async def test_a_middle_without_a_policy_is_served_as_is() -> None:
    c = Cascade([ok("B", 0.3)], [ok("C", 0.1)], [ok("D", 0.99)], middle_policy=None)
    res = await c.complete()
    assert res.served_by == "m" and c.asked("e") == 0
    assert res.judgments == [judgment("p", 0.3, 0.5, True)]


async def test_a_failing_middle_is_skipped_for_the_expert() -> None:
    c = Cascade([ok("B", 0.3)], ["refuse"], [ok("D", 0.99)])
    res = await c.complete()
    assert res.served_by == "e" and res.escalated and res.reason == "low_confidence"
    assert res.escalation_error is None and res.tiers_tried == ["p", "m", "e"]
    assert c.errors("m") == 1 and c.escalations("low_confidence", "e") == 1
    assert c.escalations("low_confidence", "m") == 0


async def test_a_failing_expert_leaves_the_unconfident_middle_with_escalation_error() -> None:
    c = Cascade([ok("B", 0.3)], [ok("C", 0.6)], ["refuse"])
    res = await c.complete()
    assert res.served_by == "m" and res.escalated and res.reason == "low_confidence"
    assert res.body["choices"][0]["message"]["content"] == "C"
    assert res.confidence == pytest.approx(0.6)
    assert "e: " in (res.escalation_error or "") and "cannot connect" in res.escalation_error
    assert c.errors("e") == 1 and c.escalations("low_confidence", "m") == 1
    assert res.agreement is False  # the primary against the middle's answer, which was served


async def test_a_middle_answering_for_a_failed_primary_is_judged_by_its_own_policy() -> None:
    c = Cascade(["refuse"], [ok("C", 0.6)], [ok("D", 0.99)])
    res = await c.complete()
    assert res.served_by == "e" and res.reason == "low_confidence" and res.primary_error
    assert res.primary_confidence is None and res.threshold is None and res.agreement is None
    assert res.judgments == [judgment("m", 0.6, 0.8, True)]
    # Counted once, under the tier that answered and the last reason.
    assert c.escalations("primary_failed", "m") == 0 and c.escalations("low_confidence", "e") == 1


async def test_a_budget_route_judges_only_the_primary() -> None:
    """What the server builds for `budget` (no middle policy): the middle is served as is."""
    c = Cascade([ok("B", 0.3)], [ok("C", 0.1)], [ok("D", 0.99)], middle_policy=None)
    c.route.policy = BudgetPolicy(1.0, min_samples=1, initial_threshold=1.0)
    res = await c.complete()
    assert res.served_by == "m" and res.reason == "budget" and c.asked("e") == 0


# --- streams (StreamRun) -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["buffer", "prefix:1"])
async def test_stream_a_confident_middle_is_held_judged_and_served(mode: str) -> None:
    closed: list[SlowStream] = []
    c = Cascade([streaming("B", 0.3, closed)], [streaming("C", 0.9)], [streaming("D", 0.99)],
                mode=mode)
    seen: list[bool] = []
    texts, res = await c.stream(on_first=lambda: seen.append(closed[0].closed))
    assert texts == ["", "C"]  # only the middle's chunks reached the client
    assert res.served_by == "m" and res.escalated and c.asked("e") == 0
    assert res.judgments == [judgment("p", 0.3, 0.5, True), judgment("m", 0.9, 0.8, False)]
    assert res.confidence == pytest.approx(0.9) and res.agreement is False
    assert seen == [True]  # the primary's stream was given up before the middle was sent


@pytest.mark.parametrize("mode", ["buffer", "prefix:1"])
async def test_stream_an_unconfident_middle_is_never_sent_and_the_expert_serves(mode: str
                                                                               ) -> None:
    closed: list[SlowStream] = []
    c = Cascade([streaming("B", 0.3)], [streaming("C", 0.6, closed)], [streaming("B", 0.99)],
                mode=mode)
    seen: list[bool] = []
    texts, res = await c.stream(on_first=lambda: seen.append(closed[0].closed))
    assert texts == ["", "B"] and res.served_by == "e" and res.reason == "low_confidence"
    assert res.judgments == [judgment("p", 0.3, 0.5, True), judgment("m", 0.6, 0.8, True)]
    assert res.primary_confidence == pytest.approx(0.3) and res.agreement is True
    assert seen == [True]  # the middle's stream was given up before the expert was sent
    assert c.escalations("low_confidence", "m") == 0 and c.escalations("low_confidence", "e") == 1


async def test_stream_a_failing_middle_is_skipped_for_the_expert() -> None:
    c = Cascade([streaming("B", 0.3)], ["refuse"], [streaming("D", 0.99)])
    texts, res = await c.stream()
    assert texts == ["", "D"] and res.served_by == "e" and res.escalation_error is None
    assert c.errors("m") == 1 and c.escalations("low_confidence", "e") == 1


@pytest.mark.parametrize("mode", ["buffer", "prefix:1"])
async def test_stream_a_failing_expert_replays_the_held_middle_with_escalation_error(
        mode: str) -> None:
    c = Cascade([streaming("B", 0.3)], [streaming("C", 0.6)], ["refuse"], mode=mode)
    texts, res = await c.stream()
    assert texts == ["", "C"] and res.served_by == "m" and res.escalated
    assert "e: " in (res.escalation_error or "") and c.errors("e") == 1
    assert res.confidence == pytest.approx(0.6)


async def test_stream_off_never_judges_a_middle_tier() -> None:
    c = Cascade(["refuse"], [streaming("C", 0.1)], [streaming("D", 0.99)], mode="off")
    texts, res = await c.stream()
    assert texts == ["", "C"] and res.served_by == "m" and res.judgments == []
    assert c.asked("e") == 0

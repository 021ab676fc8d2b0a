"""Router decisions and degradation with scripted FAKE upstreams injecting faults.

The real-model versions of these behaviours are in test_integration_vllm.py.
"""

from __future__ import annotations

import math

import httpx
import pytest
from prometheus_client import REGISTRY

from calibserve.calibration import Scorer
from calibserve.routing import (
    NeverPolicy,
    RetryPolicy,
    Route,
    Router,
    ThresholdPolicy,
    Tier,
    Upstream,
    UpstreamError,
    UpstreamUnavailable,
)
from calibserve.testing.scripted import ScriptedUpstream, SlowStream, fake_chat_events, ok, status

pytestmark = pytest.mark.anyio
NO_RETRY = RetryPolicy(max_attempts=1)
CHAT = {"model": "r", "messages": [{"role": "user", "content": "q"}]}


def tier(name: str, fake: ScriptedUpstream) -> Tier:
    up = Upstream(f"{name}-up", "http://fake", retry=NO_RETRY, transport=fake.transport())
    return Tier(name, up, Scorer.from_config(None))


def streaming(tokens: list[tuple[str, float]]):
    events = fake_chat_events(tokens)
    return lambda request: httpx.Response(200, stream=SlowStream(events))


def metric(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_never_passes_through_with_confidence_and_forced_logprobs() -> None:
    fake = ScriptedUpstream([ok("B", 0.8)])
    route = Route("never-r", [tier("primary", fake)], NeverPolicy())
    res = await Router([route]).complete("never-r", "chat", dict(CHAT))
    conf = res.body["choices"][0]["confidence"]
    assert conf == {"score": pytest.approx(0.8), "raw": pytest.approx(0.8), "method": "mean",
                    "calibrated": False}
    assert res.served_by == "primary" and not res.escalated and res.threshold is None
    assert res.body["model"] == "never-r"
    sent = fake.bodies[0]
    # The default scorer (`mean`) reads the sampled tokens' logprobs only: no alternatives.
    assert sent["model"] == "primary" and sent["logprobs"] is True and sent["top_logprobs"] == 0
    assert sent["stream"] is False
    assert res.upstream_seconds > 0 and res.tiers_tried == ["primary"]


async def test_threshold_escalates_low_confidence_only_and_records_agreement() -> None:
    primary = ScriptedUpstream([ok("B", 0.3), ok("C", 0.95)])
    expert = ScriptedUpstream([ok("C", 0.99)])
    route = Route("thr-r", [tier("p", primary), tier("e", expert)], ThresholdPolicy(0.5))
    router = Router([route])
    before = metric("calibserve_escalation_agreement_total", {"route": "thr-r", "agreed": "false"})
    low = await router.complete(route, "chat", dict(CHAT))
    assert metric("calibserve_escalations_total",
                  {"route": "thr-r", "reason": "low_confidence", "tier": "e"}) == 1
    assert low.escalated and low.served_by == "e" and low.reason == "low_confidence"
    assert low.primary_confidence == pytest.approx(0.3) and low.threshold == 0.5
    assert low.agreement is False and low.body["choices"][0]["message"]["content"] == "C"
    assert metric("calibserve_escalation_agreement_total",
                  {"route": "thr-r", "agreed": "false"}) == before + 1
    high = await router.complete(route, "chat", dict(CHAT))
    assert not high.escalated and high.served_by == "p" and len(expert.requests) == 1


async def test_dead_expert_degrades_to_primary_answer_with_error() -> None:
    route = Route("deadexp-r", [tier("p", ScriptedUpstream([ok("B", 0.2)])),
                                tier("e", ScriptedUpstream(["refuse"]))], ThresholdPolicy(0.5))
    res = await Router().complete(route, "chat", dict(CHAT))
    assert res.served_by == "p" and not res.escalated and res.reason == "low_confidence"
    assert "cannot connect" in (res.escalation_error or "")
    assert res.body["choices"][0]["message"]["content"] == "B"
    assert metric("calibserve_escalation_errors_total", {"route": "deadexp-r", "tier": "e"}) == 1


async def test_failing_primary_falls_back_and_4xx_does_not() -> None:
    route = Route("fb-r", [tier("p", ScriptedUpstream([status(503)])),
                           tier("e", ScriptedUpstream([ok("C", 0.9)]))], ThresholdPolicy(0.5))
    res = await Router().complete(route, "chat", dict(CHAT))
    assert res.served_by == "e" and res.escalated and res.reason == "primary_failed"
    assert "503" in (res.primary_error or "") and res.primary_confidence is None
    both_dead = Route("fb2-r", [tier("p", ScriptedUpstream(["refuse"])),
                                tier("e", ScriptedUpstream(["refuse"]))], ThresholdPolicy(0.5))
    with pytest.raises(UpstreamUnavailable):
        await Router().complete(both_dead, "chat", dict(CHAT))


async def test_primary_5xx_answer_falls_back_and_is_raised_when_no_tier_answers() -> None:
    """An engine's 5xx is the engine failing, not the request: another tier may answer. When
    none does, the primary's error carries the primary engine's own answer."""
    route = Route("fb5-r", [tier("p", ScriptedUpstream([status(500)])),
                            tier("e", ScriptedUpstream([ok("C", 0.9)]))], ThresholdPolicy(0.5))
    res = await Router().complete(route, "chat", dict(CHAT))
    assert res.served_by == "e" and res.escalated and res.reason == "primary_failed"
    assert "HTTP 500" in (res.primary_error or "")
    both = Route("fb5b-r", [tier("p", ScriptedUpstream([status(500)])),
                            tier("e", ScriptedUpstream([status(502)]))], ThresholdPolicy(0.5))
    with pytest.raises(UpstreamError) as info:
        await Router().complete(both, "chat", dict(CHAT))
    assert info.value.answered == 500 and info.value.body == {"error": {"message": "fake 500"}}
    unreachable = Route("fb5c-r", [
        tier("p", ScriptedUpstream(["refuse"])), tier("e", ScriptedUpstream([status(500)]))],
        ThresholdPolicy(0.5))
    with pytest.raises(UpstreamUnavailable) as refused:
        await Router().complete(unreachable, "chat", dict(CHAT))
    assert refused.value.answered is None  # the primary gave no answer: calibserve's own 503


async def test_stream_never_is_pass_through_with_confidence_on_finish_chunk() -> None:
    fake = ScriptedUpstream([streaming([("B", 0.5), ("C", 0.5)])])
    route = Route("s-never", [tier("p", fake)], NeverPolicy(), stream_mode="buffer")
    items = [i async for i in Router().stream(route, "chat", dict(CHAT, stream=True))]
    chunks = [i.data for i in items if i.data is not None]
    assert items[-1].final and items[-1].result.confidence == pytest.approx(0.5)
    assert "confidence" not in chunks[1]["choices"][0]
    assert chunks[-1]["choices"][0]["confidence"]["score"] == pytest.approx(0.5)
    assert fake.bodies[0]["stream"] is True and fake.bodies[0]["logprobs"] is True


@pytest.mark.parametrize("mode", ["buffer", "prefix:1"])
async def test_stream_escalation_switches_before_anything_is_sent(mode: str) -> None:
    primary = ScriptedUpstream([streaming([("B", 0.2), ("x", 0.99)])])
    expert = ScriptedUpstream([streaming([("C", 0.9)])])
    route = Route(f"s-{mode}", [tier("p", primary), tier("e", expert)], ThresholdPolicy(0.5),
                  stream_mode=mode)
    items = [i async for i in Router().stream(route, "chat", dict(CHAT, stream=True))]
    texts = [c["choices"][0]["delta"].get("content") for i in items if (c := i.data)]
    assert texts == ["", "C"]  # only the expert's chunks reached the client
    res = items[-1].result
    assert res.escalated and res.served_by == "e" and res.agreement is False
    expected = 0.2 if mode == "prefix:1" else math.sqrt(0.2 * 0.99)
    assert res.primary_confidence == pytest.approx(expected)


async def test_stream_dead_expert_replays_primary_with_error() -> None:
    primary = ScriptedUpstream([streaming([("B", 0.2)])])
    route = Route("s-deadexp", [tier("p", primary), tier("e", ScriptedUpstream(["refuse"]))],
                  ThresholdPolicy(0.5), stream_mode="prefix:1")
    items = [i async for i in Router().stream(route, "chat", dict(CHAT, stream=True))]
    texts = [c["choices"][0]["delta"].get("content") for i in items if (c := i.data)]
    assert texts == ["", "B"] and items[-1].result.served_by == "p"
    assert items[-1].result.escalation_error


async def test_closing_the_stream_early_closes_the_upstream_response() -> None:
    body = SlowStream(fake_chat_events([("B", 0.9), ("C", 0.9), ("D", 0.9)]), hang_after=2)
    fake = ScriptedUpstream([lambda request: httpx.Response(200, stream=body)])
    route = Route("s-close", [tier("p", fake)], NeverPolicy())
    items = Router().stream(route, "chat", dict(CHAT, stream=True))
    first = await anext(items)
    assert first.data is not None and first.result.served_by == "p"
    await items.aclose()  # what the server does when the client disconnects
    assert body.closed


async def test_budget_policy_escalates_about_its_rate() -> None:
    import random

    from calibserve.routing import BudgetPolicy

    rng = random.Random(3)
    probs = [rng.uniform(0.2, 0.99) for _ in range(120)]
    primary = ScriptedUpstream([ok("B", p) for p in probs])
    expert = ScriptedUpstream([ok("B", 0.99)])
    route = Route("budget-r", [tier("p", primary), tier("e", expert)],
                  BudgetPolicy(0.25, window=40, min_samples=20))
    router = Router([route])
    served = [(await router.complete("budget-r", "chat", dict(CHAT))) for _ in probs]
    assert not any(r.escalated for r in served[:20])  # warming up, no initial threshold
    late = served[20:]
    rate = sum(r.escalated for r in late) / len(late)
    assert 0.12 <= rate <= 0.38, rate
    for r in late:
        assert r.escalated == (r.primary_confidence < r.threshold)
        assert r.reason == ("budget" if r.escalated else None)
        assert r.served_by == ("e" if r.escalated else "p") and r.agreement in (None, True)


async def test_injected_metrics_get_every_routing_series_and_the_default_none() -> None:
    from calibserve.routing import RoutingMetrics

    m = RoutingMetrics()

    def own(fake: ScriptedUpstream, name: str) -> Tier:
        up = Upstream(f"inj-{name}", "http://fake", retry=RetryPolicy(max_attempts=2,
                      base_delay=0), transport=fake.transport(), metrics=m)
        return Tier(name, up, Scorer.from_config(None))

    def value(name: str, **labels: str) -> float:
        return m.registry.get_sample_value(name, labels) or 0.0

    route = Route("inj-r", [own(ScriptedUpstream([status(503), ok("B", 0.2)]), "p"),
                            own(ScriptedUpstream([ok("B", 0.9)]), "e")], ThresholdPolicy(0.5))
    router = Router([route], metrics=m)
    res = await router.complete("inj-r", "chat", dict(CHAT))
    assert res.escalated and res.agreement is True
    stream_route = Route("inj-s", [own(ScriptedUpstream([status(503)] * 2), "sp"),
                                   own(ScriptedUpstream([streaming([("C", 0.9)])]), "se")],
                         ThresholdPolicy(0.5))
    items = [i async for i in router.stream(stream_route, "chat", dict(CHAT, stream=True))]
    assert items[-1].result.reason == "primary_failed"
    assert value("calibserve_route_requests_total", route="inj-r") == 1
    assert value("calibserve_route_requests_total", route="inj-s") == 1
    assert value("calibserve_escalations_total", route="inj-r", reason="low_confidence",
                 tier="e") == 1
    assert value("calibserve_escalations_total", route="inj-s", reason="primary_failed",
                 tier="se") == 1
    assert value("calibserve_escalation_agreement_total", route="inj-r", agreed="true") == 1
    assert value("calibserve_upstream_retries_total", upstream="inj-p") == 1
    assert m.registry.get_sample_value("calibserve_circuit_state", {"upstream": "inj-p"}) == 0
    for name, labels in [("calibserve_route_requests_total", {"route": "inj-r"}),
                         ("calibserve_upstream_retries_total", {"upstream": "inj-p"}),
                         ("calibserve_circuit_state", {"upstream": "inj-p"})]:
        assert REGISTRY.get_sample_value(name, labels) is None

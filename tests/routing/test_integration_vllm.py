"""Escalation, streaming modes and degradation against two real vLLM CPU servers.

Primary: the merged demo model (with its calibration.json) when a merge is available, else the
demo's aligned model (mean confidence, identity calibrator). Expert: the demo's expert model.
The only fakes here are fault injectors: an unused port (dead tier) and FlakyTransport, which
refuses connections on cue in front of the real primary (breaker test).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from calibserve.calibration import Scorer
from calibserve.demo.chat import format_mc_prompt
from calibserve.routing import (
    CircuitBreaker,
    CircuitState,
    NeverPolicy,
    RetryPolicy,
    Route,
    Router,
    ThresholdPolicy,
    Tier,
    Upstream,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.anyio]
N_ITEMS = 16


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def primary_model_dir(request: pytest.FixtureRequest, demo_dir: Path) -> Path:
    """The merged model (merged_dir/model) when a merge is available, else the aligned model."""
    if not os.environ.get("CALIBSERVE_MERGED_DIR"):
        try:
            from calibserve.demo_pipeline import merge_demo  # noqa: F401
        except ImportError:
            return demo_dir / "aligned"
    merged = Path(request.getfixturevalue("merged_dir"))
    return merged / "model" if (merged / "model").is_dir() else merged


@pytest.fixture(scope="module")
def world(
    request: pytest.FixtureRequest, demo_dir: Path, vllm_server: Callable[[Path, str], str]
) -> dict[str, Any]:
    model_dir = primary_model_dir(request, demo_dir)
    cal_path = model_dir / "calibration.json"
    calibration = json.loads(cal_path.read_text()) if cal_path.exists() else None
    items = [json.loads(line) for line in (demo_dir / "data" / "test.jsonl").open()][:N_ITEMS]
    # Served under the same name as elsewhere in the suite, so one vLLM server per model is shared.
    primary_name = "merged" if cal_path.exists() else "aligned"
    return {
        "primary_name": primary_name,
        "primary_url": vllm_server(model_dir, primary_name),
        "expert_url": vllm_server(demo_dir / "expert", "expert"),
        "calibration": calibration,
        "items": items,
    }


def body(item: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "r", "max_tokens": 4, "temperature": 0.0,
            "messages": [{"role": "user", "content": format_mc_prompt(item)}], **extra}


def make_route(world: dict[str, Any], policy: Any, mode: str = "buffer", *,
               primary_url: str | None = None, expert_url: str | None = None,
               primary_transport: httpx.AsyncBaseTransport | None = None,
               breaker: CircuitBreaker | None = None) -> Route:
    fast = RetryPolicy(max_attempts=2, base_delay=0.01)
    primary = Upstream("it-primary", primary_url or world["primary_url"], timeout=60,
                       retry=fast, breaker=breaker, transport=primary_transport)
    expert = Upstream("it-expert", expert_url or world["expert_url"], timeout=60, retry=fast)
    primary_scorer = Scorer.from_config(world["calibration"])
    return Route("it", [Tier(world["primary_name"], primary, primary_scorer, name="primary"),
                        Tier("expert", expert, Scorer.from_config(None))], policy, mode)


async def collect(router: Router, route: Route, item: dict[str, Any]) -> tuple[str, Any, list]:
    items = [i async for i in router.stream(route, "chat", body(item, stream=True))]
    chunks = [i.data for i in items if i.data is not None]
    text = "".join((c["choices"][0]["delta"].get("content") or "")
                   for c in chunks if c.get("choices"))
    return text, items[-1].result, chunks


@pytest.fixture(scope="module")
def observed(world: dict[str, Any]) -> dict[str, Any]:
    """One pass with `never`: each item's primary confidence and both tiers' answers."""
    return asyncio.run(_observe(world))


async def _observe(world: dict[str, Any]) -> dict[str, Any]:
    route = make_route(world, NeverPolicy())
    expert_only = Route("x", [route.tiers[1]], NeverPolicy())
    router = Router()
    conf, primary_text, expert_text = [], [], []
    for item in world["items"]:
        res = await router.complete(route, "chat", body(item))
        conf.append(res.confidence)
        primary_text.append(res.body["choices"][0]["message"]["content"])
        ex = await router.complete(expert_only, "chat", body(item))
        expert_text.append(ex.body["choices"][0]["message"]["content"])
    await route.tiers[0].upstream.aclose()
    await route.tiers[1].upstream.aclose()
    # A threshold in the widest gap around the median: robust to tiny numeric jitter.
    ranked = sorted(set(conf))
    assert len(ranked) >= 2, f"need distinct confidences, got {conf}"
    mid = len(ranked) // 2
    lo, hi = max(((ranked[i], ranked[i + 1]) for i in range(max(0, mid - 3),
                                                           min(len(ranked) - 1, mid + 3))),
                 key=lambda p: p[1] - p[0])
    return {"conf": conf, "primary": primary_text, "expert": expert_text,
            "threshold": (lo + hi) / 2}


async def test_low_confidence_escalates_and_high_does_not(world, observed) -> None:
    t = observed["threshold"]
    route, router = make_route(world, ThresholdPolicy(t)), Router()
    escalated = 0
    for i, item in enumerate(world["items"]):
        res = await router.complete(route, "chat", body(item))
        low = observed["conf"][i] < t
        assert res.escalated is low and res.served_by == ("expert" if low else "primary")
        assert res.primary_confidence == pytest.approx(observed["conf"][i], abs=1e-4)
        assert res.threshold == t and res.reason == ("low_confidence" if low else None)
        want = observed["expert" if low else "primary"][i]
        assert res.body["choices"][0]["message"]["content"] == want
        assert 0.0 <= res.body["choices"][0]["confidence"]["score"] <= 1.0
        if low:
            escalated += 1
            assert res.agreement is (observed["primary"][i].strip()
                                     == observed["expert"][i].strip())
    assert 0 < escalated < len(world["items"])


async def test_buffer_stream_serves_exactly_one_tier(world, observed) -> None:
    t = observed["threshold"]
    route, router = make_route(world, ThresholdPolicy(t), "buffer"), Router()
    for i, item in enumerate(world["items"][:6]):
        text, res, chunks = await collect(router, route, item)
        low = observed["conf"][i] < t
        assert res.served_by == ("expert" if low else "primary")
        assert text == observed["expert" if low else "primary"][i]
        finals = [c for c in chunks if c.get("choices") and c["choices"][0].get("finish_reason")]
        assert len(finals) == 1 and "confidence" in finals[0]["choices"][0]
        assert res.primary_confidence == pytest.approx(observed["conf"][i], abs=1e-4)


async def test_prefix_stream_decides_on_first_token(world, observed) -> None:
    route, router = make_route(world, ThresholdPolicy(1.0), "prefix:1"), Router()
    scorer = route.tiers[0].confidence_scorer
    for i, item in enumerate(world["items"][:4]):
        plain = await Router().complete(Route("n", [route.tiers[0]]), "chat", body(item))
        first = plain.body["choices"][0]["logprobs"]["content"][:1]
        expected = scorer.score_choice({"content": first}).score
        text, res, _ = await collect(router, route, item)
        # threshold 1.0: every answer escalates, decided on the first token's confidence.
        assert res.primary_confidence == pytest.approx(expected, abs=1e-4)
        assert res.served_by == "expert" and text == observed["expert"][i]
    keep = make_route(world, ThresholdPolicy(0.0), "prefix:1")
    text, res, _ = await collect(router, keep, world["items"][0])
    assert res.served_by == "primary" and text == observed["primary"][0]


async def test_off_stream_never_escalates_and_reports_confidence_at_end(world, observed) -> None:
    route, router = make_route(world, ThresholdPolicy(1.0), "off"), Router()
    text, res, chunks = await collect(router, route, world["items"][0])
    assert res.served_by == "primary" and not res.escalated and text == observed["primary"][0]
    assert res.confidence == pytest.approx(observed["conf"][0], abs=1e-4)
    final = [c for c in chunks if c.get("choices") and c["choices"][0].get("finish_reason")]
    assert final[0]["choices"][0]["confidence"]["score"] == pytest.approx(res.confidence)


async def test_dead_expert_degrades_to_primary_answer(world, observed) -> None:
    route = make_route(world, ThresholdPolicy(1.0), expert_url=dead_url())
    res = await Router().complete(route, "chat", body(world["items"][0]))
    assert res.served_by == "primary" and not res.escalated and res.reason == "low_confidence"
    assert "cannot connect" in (res.escalation_error or "")
    assert res.body["choices"][0]["message"]["content"] == observed["primary"][0]
    text, sres, _ = await collect(Router(), route, world["items"][0])
    assert sres.served_by == "primary" and sres.escalation_error and text == observed["primary"][0]


async def test_dead_primary_falls_back_to_expert(world, observed) -> None:
    route = make_route(world, ThresholdPolicy(0.5), primary_url=dead_url())
    res = await Router().complete(route, "chat", body(world["items"][1]))
    assert res.served_by == "expert" and res.escalated and res.reason == "primary_failed"
    assert res.body["choices"][0]["message"]["content"] == observed["expert"][1]
    text, sres, _ = await collect(Router(), route, world["items"][1])
    assert sres.served_by == "expert" and text == observed["expert"][1]


class FlakyTransport(httpx.AsyncBaseTransport):
    """FAULT INJECTOR in front of the real primary: refuses connections while `down`."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.down:
            raise httpx.ConnectError("fault injected: refused", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_breaker_opens_then_half_open_probe_closes_it(world, observed) -> None:
    flaky = FlakyTransport()
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=0.5)
    route = make_route(world, ThresholdPolicy(0.0), primary_transport=flaky, breaker=breaker)
    route.tiers[0].upstream.retry = RetryPolicy(max_attempts=1)
    router, item = Router(), world["items"][0]
    flaky.down = True
    for _ in range(2):
        assert (await router.complete(route, "chat", body(item))).reason == "primary_failed"
    assert breaker.state is CircuitState.OPEN
    calls = flaky.calls
    res = await router.complete(route, "chat", body(item))
    assert res.served_by == "expert" and "circuit open" in (res.primary_error or "")
    assert flaky.calls == calls  # failed fast, the primary was not tried
    flaky.down = False
    await asyncio.sleep(0.6)
    res = await router.complete(route, "chat", body(item))
    assert res.served_by == "primary" and breaker.state is CircuitState.CLOSED


async def test_n2_decides_on_the_least_confident_choice(world, observed) -> None:
    route, router = make_route(world, ThresholdPolicy(0.0)), Router()
    res = await router.complete(route, "chat", body(world["items"][0], n=2, temperature=1.0))
    scores = [c["confidence"]["score"] for c in res.body["choices"]]
    assert len(scores) == 2 and res.primary_confidence == pytest.approx(min(scores))
    items = [i async for i in router.stream(route, "chat",
                                             body(world["items"][0], n=2, stream=True,
                                                  temperature=1.0))]
    finals = [ch for i in items if (c := i.data) for ch in c.get("choices") or []
              if ch.get("finish_reason")]
    assert sorted(ch["index"] for ch in finals) == [0, 1]
    assert items[-1].result.confidence == pytest.approx(
        min(ch["confidence"]["score"] for ch in finals))


async def test_completions_endpoint_gets_logprobs_and_confidence(world, observed) -> None:
    route = make_route(world, ThresholdPolicy(0.0))
    prompt = f"<|user|> {format_mc_prompt(world['items'][0])} <|assistant|> answer :"
    res = await Router().complete(route, "completions",
                                  {"model": "r", "prompt": prompt, "max_tokens": 2,
                                   "temperature": 0.0})
    choice = res.body["choices"][0]
    assert len(choice["logprobs"]["top_logprobs"][0]) >= 5  # forced: logprobs >= 5
    assert 0.0 <= choice["confidence"]["score"] <= 1.0 and res.served_by == "primary"

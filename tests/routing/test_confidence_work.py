"""The extra confidence work (verify, consistency) in both router paths, on in-process fakes.

The verify request goes to the SAME tier's upstream with max_tokens 1, is never seen by the
client, never escalates, falls back to `mean` (labelled so) when it fails, and the streamed and
non-streamed paths agree on the confidence.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import httpx
import pytest

from calibserve.calibration import CalibrationDocument, Scorer
from calibserve.calibration.verify import VERIFY_QUESTION, VERIFY_SUFFIX
from calibserve.routing import (
    NeverPolicy,
    RetryPolicy,
    Route,
    Router,
    RoutingMetrics,
    ThresholdPolicy,
    Tier,
    Upstream,
)
from calibserve.routing.confidence_work import TEMPLATE_TOKENS, fit_reply
from calibserve.testing.scripted import ScriptedUpstream, fake_chat_answer, fake_chat_events

pytestmark = pytest.mark.anyio
NO_RETRY = RetryPolicy(max_attempts=1)
PLATT = {"type": "platt", "a": 2.0, "b": 0.0}  # sigmoid(2 logit p): 0.75 -> 0.9
MESSAGES = [{"role": "user", "content": "capital of france ?"}]


def scorer(free_form: str, calibrated: bool = False, **params: Any) -> Scorer:
    entry: dict[str, Any] = {"params": params} if params else {}
    if calibrated:
        entry["calibrator"] = PLATT
        entry["thresholds"] = [{"target_accuracy": 0.8, "threshold": 0.7, "coverage": 0.5}]
    doc = CalibrationDocument.from_dict({
        "version": 2, "multiple_choice": "answer", "free_form": free_form,
        "methods": {"answer": {"thresholds": [{"target_accuracy": 0.8, "threshold": 0.2,
                                               "coverage": 0.5}]},
                    free_form: entry}})
    return Scorer.from_document(doc)


def verdict(top: dict[str, float]) -> dict[str, Any]:
    first = next(iter(top))
    return {"object": "chat.completion", "model": "fake", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": first}, "finish_reason": "length",
        "logprobs": {"content": [{"token": first, "logprob": math.log(top[first]),
                                  "top_logprobs": [{"token": t, "logprob": math.log(p)}
                                                   for t, p in top.items()]}]}}]}


def completion_verdict(top: dict[str, float]) -> dict[str, Any]:
    first = next(iter(top))
    return {"object": "text_completion", "model": "fake", "choices": [{
        "index": 0, "text": first, "finish_reason": "length",
        "logprobs": {"tokens": [first], "token_logprobs": [math.log(top[first])],
                     "top_logprobs": [{t: math.log(p) for t, p in top.items()}]}}]}


YES_NO = {"yes": 0.6, "no": 0.2, "maybe": 0.1}  # P(yes) renormalised: 0.75


class Engine:
    """A fake engine: answers the main request with `text`, verdicts with `top`, samples."""

    def __init__(self, text: str = "paris", prob: float = 0.5, top: dict[str, float] = YES_NO,
                 samples: list[str] | None = None, verify_status: int = 200) -> None:
        self.text, self.prob, self.top = text, prob, top
        self.samples = samples or []
        self.verify_status = verify_status
        self.fake = ScriptedUpstream([self.handle])

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body.get("max_tokens") == 1:
            if self.verify_status != 200:
                return httpx.Response(self.verify_status, json={"error": {"message": "boom"}})
            if request.url.path.endswith("/completions") and "prompt" in body:
                return httpx.Response(200, json=completion_verdict(self.top))
            return httpx.Response(200, json=verdict(self.top))
        if "n" in body and body["n"] > 1 and not body.get("logprobs"):
            answer = fake_chat_answer("x", 0.5)
            answer["choices"] = [{"index": i, "message": {"role": "assistant", "content": s},
                                  "finish_reason": "stop"} for i, s in enumerate(self.samples)]
            return httpx.Response(200, json=answer)
        if body.get("stream"):
            content = b"".join(fake_chat_events([(self.text, self.prob)]))
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=content)
        answer = fake_chat_answer(self.text, self.prob)
        n = int(body.get("n") or 1)
        answer["choices"] = [dict(answer["choices"][0], index=i) for i in range(n)]
        return httpx.Response(200, json=answer)

    def upstream(self, name: str, metrics: RoutingMetrics) -> Upstream:
        return Upstream(name, "http://fake", retry=NO_RETRY, transport=self.fake.transport(),
                        metrics=metrics)

    def extra(self) -> list[dict[str, Any]]:
        return [b for b in self.fake.bodies if b.get("max_tokens") == 1 or
                (int(b.get("n") or 1) > 1 and not b.get("logprobs"))]


def build(engine: Engine, s: Scorer, policy: Any = None,
          expert: Engine | None = None) -> tuple[Router, RoutingMetrics]:
    metrics = RoutingMetrics()
    tiers = [Tier("m", engine.upstream("p", metrics), s, name="primary")]
    if expert is not None:
        tiers.append(Tier("e", expert.upstream("e", metrics), None, name="expert"))
    route = Route("r", tiers, policy=policy or NeverPolicy(), stream_mode="buffer")
    return Router([route], metrics=metrics), metrics


def count(metrics: RoutingMetrics, method: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "calibserve_confidence_requests_total", {"route": "r", "method": method,
                                                 "outcome": outcome})
    return value or 0.0


async def stream_confidence(router: Router, body: dict[str, Any]) -> dict[str, Any]:
    confs = []
    async for item in router.stream("r", "chat", {**body, "stream": True}):
        if item.data is None:
            break
        for choice in item.data.get("choices") or []:
            if "confidence" in choice:
                confs.append(choice["confidence"])
    assert len(confs) == 1
    return confs[0]


async def test_verify_asks_the_same_upstream_a_one_token_question() -> None:
    engine = Engine()
    router, metrics = build(engine, scorer("verify"))
    res = await router.complete("r", "chat", {"model": "r", "messages": MESSAGES})
    choices = res.body["choices"]  # type: ignore[index]
    assert len(choices) == 1 and choices[0]["message"]["content"] == "paris"
    assert choices[0]["confidence"] == {"score": pytest.approx(0.75), "raw": pytest.approx(0.75),
                                        "method": "verify", "calibrated": False}
    (main, extra) = engine.fake.bodies
    assert extra == {"model": "m", "max_tokens": 1, "temperature": 0, "stream": False,
                     "logprobs": True, "top_logprobs": 20,
                     "messages": [*MESSAGES, {"role": "assistant", "content": "paris"},
                                  {"role": "user", "content": VERIFY_QUESTION}]}
    assert main["logprobs"] is True and "max_tokens" not in main
    assert count(metrics, "verify", "ok") == 1
    assert metrics.registry.get_sample_value("calibserve_route_requests_total",
                                             {"route": "r"}) == 1


async def test_verify_through_its_own_map_and_the_question_override() -> None:
    engine = Engine()
    router, _ = build(engine, scorer("verify", calibrated=True, question="Right?"))
    res = await router.complete("r", "chat", {"model": "r", "messages": MESSAGES})
    conf = res.body["choices"][0]["confidence"]  # type: ignore[index]
    assert conf["method"] == "verify" and conf["calibrated"] is True
    assert conf["score"] == pytest.approx(0.9)
    assert engine.extra()[0]["messages"][-1]["content"] == "Right?"


async def test_streamed_and_non_streamed_agree() -> None:
    for s in (scorer("verify"), scorer("verify", calibrated=True)):
        engine = Engine()
        router, metrics = build(engine, s, expert=Engine(text="lyon"),
                                policy=ThresholdPolicy(0.1))
        body = {"model": "r", "messages": MESSAGES}
        whole = (await router.complete("r", "chat", body)).body["choices"][0]["confidence"]  # type: ignore[index]
        streamed = await stream_confidence(router, body)
        assert streamed == whole and streamed["method"] == "verify"
        assert count(metrics, "verify", "ok") == 2
        # the verify request of the stream is a plain JSON request, asked after the reply ended
        assert [b.get("stream") for b in engine.fake.bodies] == [False, False, True, False]


@pytest.mark.parametrize(("engine", "outcome"), [
    (Engine(top={"paris": 0.9, "maybe": 0.1}), "no_verdict"),
    (Engine(verify_status=500), "error"),
])
async def test_failed_verify_falls_back_to_mean_and_never_escalates(
    engine: Engine, outcome: str
) -> None:
    expert = Engine(text="lyon")
    router, metrics = build(engine, scorer("verify"), policy=ThresholdPolicy(0.3), expert=expert)
    res = await router.complete("r", "chat", {"model": "r", "messages": MESSAGES})
    conf = res.body["choices"][0]["confidence"]  # type: ignore[index]
    assert conf == {"score": 0.5, "raw": 0.5, "method": "mean", "calibrated": False}
    assert res.served_by == "primary" and not res.escalated and not expert.fake.bodies
    assert count(metrics, "verify", outcome) == 1
    assert metrics.registry.get_sample_value(
        "calibserve_escalations_total", {"route": "r", "reason": "primary_failed",
                                         "tier": "expert"}) is None
    streamed = await stream_confidence(router, {"model": "r", "messages": MESSAGES})
    assert streamed == conf


async def test_n_choices_are_verified_concurrently_one_request_each() -> None:
    engine = Engine()
    in_flight = 0
    peak = 0
    original = engine.fake.handle

    async def handle(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        try:
            return await original(request)
        finally:
            in_flight -= 1

    engine.fake.handle = handle  # type: ignore[method-assign]
    router, metrics = build(engine, scorer("verify"))
    res = await router.complete("r", "chat", {"model": "r", "messages": MESSAGES, "n": 3})
    confs = [c["confidence"]["method"] for c in res.body["choices"]]  # type: ignore[index]
    assert confs == ["verify"] * 3
    assert len(engine.extra()) == 3 and peak == 3
    assert count(metrics, "verify", "ok") == 3


async def test_option_letter_replies_keep_answer_and_cost_nothing() -> None:
    engine = Engine(text="B", prob=0.8)
    router, metrics = build(engine, scorer("verify"))
    options = [{"role": "user", "content": "capital of france ?\nA. paris\nB. rome"}]
    res = await router.complete("r", "chat", {"model": "r", "messages": options})
    assert res.body["choices"][0]["confidence"]["method"] == "answer"  # type: ignore[index]
    assert engine.extra() == [] and count(metrics, "verify", "ok") == 0


async def test_a_letter_reply_to_a_prompt_without_options_is_free_form() -> None:
    """"B" after "capital of france ?" answers no multiple-choice question: verify scores it."""
    engine = Engine(text="B", prob=0.8)
    router, metrics = build(engine, scorer("verify"))
    res = await router.complete("r", "chat", {"model": "r", "messages": MESSAGES})
    assert res.body["choices"][0]["confidence"]["method"] == "verify"  # type: ignore[index]
    assert count(metrics, "verify", "ok") == 1


async def test_completions_verify_uses_the_prompt_and_20_logprobs() -> None:
    engine = Engine()

    def completion(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body.get("max_tokens") == 1:
            return httpx.Response(200, json=completion_verdict(YES_NO))
        return httpx.Response(200, json={"object": "text_completion", "model": "fake",
                                         "choices": [{"index": 0, "text": " paris",
                                                      "finish_reason": "stop",
                                                      "logprobs": {"tokens": [" paris"],
                                                                   "token_logprobs": [-0.7],
                                                                   "top_logprobs": [{}]}}]})

    engine.fake.steps = [completion]
    router, metrics = build(engine, scorer("verify"))
    res = await router.complete("r", "completions", {"model": "r", "prompt": "q : capital ?"})
    assert res.body["choices"][0]["confidence"]["method"] == "verify"  # type: ignore[index]
    extra = engine.fake.bodies[1]
    assert extra["prompt"] == "q : capital ?" + " paris" + VERIFY_SUFFIX
    assert extra["max_tokens"] == 1 and extra["logprobs"] == 20
    # a tokenised prompt cannot be rephrased: served as mean, counted as unsupported
    res = await router.complete("r", "completions", {"model": "r", "prompt": [1, 2, 3]})
    assert res.body["choices"][0]["confidence"]["method"] == "mean"  # type: ignore[index]
    assert count(metrics, "verify", "unsupported") == 1


async def test_consistency_is_one_request_with_n_k_shared_by_the_choices() -> None:
    engine = Engine(samples=["Paris.", "paris", "the Paris", "lyon", "rome"])
    router, metrics = build(engine, scorer("consistency", k=5))
    body = {"model": "r", "messages": MESSAGES, "n": 2, "temperature": 0.7, "top_p": 0.5,
            "max_tokens": 8}
    res = await router.complete("r", "chat", body)
    confs = [c["confidence"] for c in res.body["choices"]]  # type: ignore[index]
    assert [c["method"] for c in confs] == ["consistency"] * 2
    assert confs[0]["raw"] == pytest.approx(0.6)
    (sample,) = engine.extra()
    # The model's own distribution, whatever the client samples with (the fitted map then
    # applies to every client): temperature 1, no truncation; the length budget is the client's.
    assert sample["n"] == 5 and sample["temperature"] == 1.0 and sample["max_tokens"] == 8
    assert "top_p" not in sample
    assert "logprobs" not in sample and "top_logprobs" not in sample
    assert count(metrics, "consistency", "ok") == 1
    default_t = Engine(samples=["paris"] * 5)
    router, _ = build(default_t, scorer("consistency"))
    await router.complete("r", "chat", {"model": "r", "messages": MESSAGES, "temperature": 0})
    assert default_t.extra()[0]["temperature"] == 1.0  # a greedy client's samples still vary
    streamed = await stream_confidence(router, {"model": "r", "messages": MESSAGES})
    assert streamed["method"] == "consistency" and streamed["raw"] == 1.0


async def test_escalation_judges_by_the_scoring_methods_threshold() -> None:
    # verify calibrated, threshold 0.95 of its own; answer's threshold is 0.2.
    s = scorer("verify", calibrated=True)
    doc_policy = ThresholdPolicy(0.2, methods={"answer": 0.2, "verify": 0.95}, free_form="verify")
    engine, expert = Engine(), Engine(text="lyon")
    router, _ = build(engine, s, policy=doc_policy, expert=expert)
    res = await router.complete("r", "chat", {"model": "r", "messages": MESSAGES})
    # served verify score 0.9 < 0.95: escalated on verify's own threshold, not answer's 0.2
    assert res.escalated and res.threshold == 0.95 and res.reason == "low_confidence"
    assert res.primary_confidence == pytest.approx(0.9)


async def test_verify_asks_for_exactly_the_verdict_token_ids_when_the_document_has_them(
) -> None:
    ids = {"yes": [11, 12], "no": [13]}
    engine = Engine()
    router, _ = build(engine, scorer("verify", verdict_token_ids=ids))
    res = await router.complete("r", "chat", {"model": "r", "messages": MESSAGES})
    assert res.body["choices"][0]["confidence"]["method"] == "verify"  # type: ignore[index]
    extra = engine.fake.bodies[1]
    assert extra["logprob_token_ids"] == [11, 12, 13] and extra["top_logprobs"] == 1
    assert extra["logprobs"] is True and extra["max_tokens"] == 1
    await router.complete("r", "completions", {"model": "r", "prompt": "q : capital ?"})
    extra = engine.fake.bodies[-1]
    assert extra["logprob_token_ids"] == [11, 12, 13] and extra["logprobs"] == 1


# A reply that ran to the engine's context length leaves no room for the verify question: the
# engine refuses the verify prompt (HTTP 400, vLLM's `param: input_tokens`). Issue 12: on
# SmolLM2 behind a 256-token CPU engine, replies without max_tokens ran to the limit and their
# verify always fell back to `mean`.
CONTEXT = 200  # the fake engine's context, in tokens (one "w " piece = one token)
OVERFLOW = {"error": {"message": "This model's maximum context length is 200 tokens. However, "
                                 "your prompt contains at least 201 input tokens",
                      "type": "BadRequestError", "param": "input_tokens", "code": 400}}


class ContextEngine(Engine):
    """Replies with `n_tokens` pieces "w "; refuses a verify prompt over `CONTEXT` tokens
    (the reply's pieces plus one token per byte of the question: an upper bound)."""

    def __init__(self, n_tokens: int, refusal: dict[str, Any] = OVERFLOW) -> None:
        super().__init__()
        self.n_tokens, self.refusal = n_tokens, refusal

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        pieces = [("w ", 0.5)] * self.n_tokens
        if body.get("max_tokens") == 1:
            reply, question = body["messages"][-2]["content"], body["messages"][-1]["content"]
            if reply.count("w") + len(question) > CONTEXT:
                return httpx.Response(400, json=self.refusal)
            return httpx.Response(200, json=verdict(self.top))
        if body.get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=b"".join(fake_chat_events(pieces)))
        answer = fake_chat_answer("w " * self.n_tokens, 0.5)
        answer["choices"][0]["logprobs"] = {"content": [
            {"token": t, "logprob": math.log(p), "top_logprobs": [{"token": t,
                                                                   "logprob": math.log(p)}]}
            for t, p in pieces]}
        return httpx.Response(200, json=answer)


async def test_verify_of_a_reply_that_filled_the_context_is_retried_with_its_tail_cut() -> None:
    engine = ContextEngine(CONTEXT - 20)
    router, metrics = build(engine, scorer("verify"))
    body = {"model": "r", "messages": MESSAGES}
    res = await router.complete("r", "chat", body)
    choice = res.body["choices"][0]  # type: ignore[index]
    assert choice["message"]["content"] == "w " * (CONTEXT - 20)  # the client's reply is whole
    assert choice["confidence"]["method"] == "verify"
    assert choice["confidence"]["raw"] == pytest.approx(0.75)
    refused, retried = engine.extra()
    assert refused["messages"][-2]["content"] == "w " * (CONTEXT - 20)
    # cut by the question's bytes, the template's allowance and the verdict token, no more
    cut = CONTEXT - 20 - (len(VERIFY_QUESTION.encode()) + TEMPLATE_TOKENS + 1)
    assert retried["messages"][-2]["content"] == "w " * cut
    assert retried["messages"][-1]["content"] == VERIFY_QUESTION
    assert count(metrics, "verify", "ok") == 1 and count(metrics, "verify", "error") == 0
    streamed = await stream_confidence(router, body)
    assert streamed == choice["confidence"]


async def test_verify_refused_for_another_reason_is_not_retried() -> None:
    refusal = {"error": {"message": "bad messages", "type": "BadRequestError",
                         "param": "messages", "code": 400}}
    engine = ContextEngine(CONTEXT - 20, refusal=refusal)
    router, metrics = build(engine, scorer("verify"))
    res = await router.complete("r", "chat", {"model": "r", "messages": MESSAGES})
    assert res.body["choices"][0]["confidence"]["method"] == "mean"  # type: ignore[index]
    assert len(engine.extra()) == 1 and count(metrics, "verify", "error") == 1


def test_fit_reply_keeps_nothing_rather_than_an_empty_reply() -> None:
    question = "ok?"
    need = len(question) + TEMPLATE_TOKENS + 1
    assert fit_reply(["a"] * need, question) is None
    assert fit_reply(["a", "", "b"] * need, question) == "ab" * (need // 2) + "a" * (need % 2)

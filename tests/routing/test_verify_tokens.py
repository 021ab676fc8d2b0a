"""verify's prompt on token ids (routing/verify_tokens.py), on an in-process fake engine that
tokenises like a chat model: each word an id, ChatML-like turn markers, the end-of-sequence id
closing the assistant's turn.

What must hold: the main request asks for its token ids only when verify may score its reply;
the verify prompt is the reply's prompt + its tokens (less the end-of-sequence) + the tail the
engine's own template adds, learned once per tier; a reply whose ids are not its text (a stop
string cut it), a template whose tail cannot be read, or an engine that cannot tell keeps the text
prompt; the client never sees ids it did not ask for.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest

from calibserve.calibration.verify import VERIFY_QUESTION, VERIFY_SUFFIX
from calibserve.routing import (
    NeverPolicy,
    RetryPolicy,
    Route,
    Router,
    RoutingMetrics,
    Tier,
    Upstream,
    verify_tokens,
)
from calibserve.routing.payload import verify_reads_ids
from calibserve.routing.verify_tokens import (
    PROBE_REPLY,
    PROBE_USER,
    ReplyIds,
    reply_ids,
    split_tail,
)
from calibserve.testing.scripted import ScriptedUpstream
from tests.routing.test_confidence_work import YES_NO, count, scorer
from tests.routing.test_confidence_work import verdict as chat_verdict

pytestmark = pytest.mark.anyio
NO_RETRY = RetryPolicy(max_attempts=1)
USER, END, ASSISTANT, EOS = 1, 2, 4, 3  # turn markers; EOS closes the assistant's turn
MESSAGES = [{"role": "user", "content": "capital of france ?"}]


class Vocab:
    """Word-level ids from 10 up, the same word always the same id."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str) -> list[int]:
        return [self.ids.setdefault(w, 10 + len(self.ids)) for w in text.split()]


class ChatEngine:
    """A fake engine: `reply` to every main request, a 0.75 verdict to every 1-token request on
    token ids, prompt ids for the 1-token probes. `template_ok=False` renders earlier assistant
    turns differently from the generation prompt (the tail cannot be read)."""

    def __init__(self, reply: str = "paris", finish: str = "stop", stop: Any = None,
                 template_ok: bool = True, ids: bool = True) -> None:
        self.vocab = Vocab()
        self.reply, self.finish, self.stop = reply, finish, stop
        self.template_ok, self.ids = template_ok, ids
        self.fake = ScriptedUpstream([self.handle])

    def render(self, messages: list[dict[str, Any]]) -> list[int]:
        out: list[int] = []
        for m in messages:
            if m["role"] == "assistant":
                head = [ASSISTANT] if self.template_ok else [ASSISTANT, ASSISTANT]
                out += head + self.vocab(m["content"]) + [EOS]
            else:
                out += [USER] + self.vocab(m["content"]) + [END]
        return out + [ASSISTANT]

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        chat = request.url.path.endswith("/chat/completions")
        if body.get("max_tokens") == 1 and isinstance(body.get("prompt"), list):
            return httpx.Response(200, json=verdict())
        if body.get("max_tokens") == 1 and not body.get("return_token_ids"):
            return httpx.Response(200, json=chat_verdict(YES_NO))  # verify on text
        if chat:
            prompt = self.render(body["messages"])
        else:
            prompt = ([] if body.get("add_special_tokens") is False else [0]) + \
                self.vocab(body["prompt"])
        tokens = self.vocab(self.reply) + ([EOS] if self.finish == "stop" else [])
        keep = self.ids and body.get("return_token_ids")
        if body.get("stream"):
            return self.stream(chat, prompt if keep else None, tokens if keep else None)
        choice: dict[str, Any] = {
            "index": 0, "finish_reason": self.finish, "stop_reason": self.stop,
            "token_ids": tokens if keep else None,
            "logprobs": {"content": [{"token": self.reply, "logprob": math.log(0.5),
                                      "top_logprobs": []}]} if chat else {
                "tokens": [self.reply], "token_logprobs": [math.log(0.5)],
                "top_logprobs": [{self.reply: math.log(0.5)}]}}
        answer: dict[str, Any] = {"object": "chat.completion" if chat else "text_completion",
                                  "model": "m", "choices": [choice]}
        if chat:
            choice["message"] = {"role": "assistant", "content": self.reply}
            answer["prompt_token_ids"] = prompt if keep else None
        else:
            choice["text"] = self.reply
            choice["prompt_token_ids"] = prompt if keep else None
        return httpx.Response(200, json=answer)

    def stream(self, chat: bool, prompt: list[int] | None, tokens: list[int] | None
               ) -> httpx.Response:
        """The reply one word a chunk (the end-of-sequence id in the finishing chunk), the
        prompt's ids in the first chunk, as vLLM streams them with `return_token_ids`."""
        words = self.reply.split()
        events: list[dict[str, Any]] = []
        for i, word in enumerate(words):
            last = i == len(words) - 1
            ids = None if tokens is None else tokens[i:] if last else [tokens[i]]
            text = word if i == 0 else " " + word
            lp = {"content": [{"token": text, "logprob": math.log(0.5), "top_logprobs": []}]}
            choice: dict[str, Any] = {
                "index": 0, "finish_reason": self.finish if last else None,
                "stop_reason": self.stop if last else None, "token_ids": ids}
            if chat:
                choice |= {"delta": {"content": text}, "logprobs": lp}
            else:
                choice |= {"text": text, "logprobs": {
                    "tokens": [text], "token_logprobs": [math.log(0.5)],
                    "top_logprobs": [{text: math.log(0.5)}]}}
                if i == 0:
                    choice["prompt_token_ids"] = prompt
            event: dict[str, Any] = {"object": "chat.completion.chunk" if chat else
                                     "text_completion", "model": "m", "choices": [choice]}
            if chat and i == 0:
                event["prompt_token_ids"] = prompt
            events.append(event)
        content = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=content + b"data: [DONE]\n\n")

    def router(self, free_form: str = "verify") -> tuple[Router, RoutingMetrics]:
        metrics = RoutingMetrics()
        upstream = verify_tokens_upstream(self, metrics)
        route = Route("r", [Tier("m", upstream, scorer(free_form), name="primary")],
                      policy=NeverPolicy(), stream_mode="buffer")
        return Router([route], metrics=metrics), metrics

    def paths(self) -> list[str]:
        return [r.url.path for r in self.fake.requests]

    def verifies(self) -> list[dict[str, Any]]:
        return [b for b in self.fake.bodies if b.get("max_tokens") == 1 and
                not b.get("return_token_ids")]


def verify_tokens_upstream(engine: ChatEngine, metrics: RoutingMetrics) -> Upstream:
    return Upstream("p", "http://fake", retry=NO_RETRY, transport=engine.fake.transport(),
                    metrics=metrics)


def verdict() -> dict[str, Any]:
    return {"object": "text_completion", "model": "m", "choices": [{
        "index": 0, "text": "yes", "finish_reason": "length",
        "logprobs": {"tokens": ["yes"], "token_logprobs": [math.log(0.6)],
                     "top_logprobs": [{"yes": math.log(0.6), "no": math.log(0.2)}]}}]}


# -- reply_ids and split_tail ------------------------------------------------------------------
@pytest.mark.parametrize(("finish", "stop", "expected"), [
    ("length", None, (7, 8, 9)),
    ("stop", None, (7, 8)),  # end-of-sequence: the template's tail closes the turn
    ("stop", 9, (7, 8)),  # a stop token id
    ("stop", "\n", None),  # a stop string cut the text: its ids are not the text
    ("abort", None, None),
])
def test_reply_ids_only_when_they_are_the_text(finish: str, stop: Any, expected: Any) -> None:
    choice = {"finish_reason": finish, "stop_reason": stop, "token_ids": [7, 8, 9],
              "message": {"role": "assistant", "content": "x"}}
    got = reply_ids("chat", {"prompt_token_ids": [1, 2]}, choice)
    assert got == (None if expected is None else ReplyIds((1, 2), expected))


def test_reply_ids_read_where_each_endpoint_puts_them() -> None:
    choice = {"finish_reason": "length", "token_ids": [5], "prompt_token_ids": [1]}
    assert reply_ids("completions", {}, choice) == ReplyIds((1,), (5,))
    assert reply_ids("chat", {}, {**choice, "message": {"content": "x"}}) is None
    assert reply_ids("completions", {}, {**choice, "token_ids": None}) is None
    assert reply_ids("completions", {}, {**choice, "prompt_token_ids": ["1"]}) is None
    tools = {**choice, "message": {"content": "", "tool_calls": [{"id": "t"}]}}
    assert reply_ids("chat", {"prompt_token_ids": [1]}, tools) is None


def test_split_tail() -> None:
    assert split_tail([1, 2], [1, 2, 7, 3, 4], [7]) == (3, 4)
    assert split_tail([1, 2], [1, 9, 7, 3, 4], [7]) is None  # the conversation re-rendered
    assert split_tail([1, 2], [1, 2, 8, 3, 4], [7]) is None  # the reply re-tokenised
    assert split_tail([1, 2], [1, 2, 7], [7]) is None  # nothing after the reply


# -- what the main request asks for -----------------------------------------------------------
def test_ids_are_asked_for_only_where_verify_may_score_the_reply() -> None:
    chat = {"messages": MESSAGES}
    verify, mean = scorer("verify"), scorer("mean")
    assert verify_reads_ids(verify, "chat", chat, False)
    assert verify_reads_ids(verify, "chat", chat, None)
    assert not verify_reads_ids(verify, "chat", chat, True)  # options: answer / no_letter
    assert not verify_reads_ids(mean, "chat", chat, False)
    assert verify_reads_ids(verify, "completions", {"prompt": "q"}, False)
    assert not verify_reads_ids(verify, "completions", {"prompt": [1, 2]}, None)
    assert not verify_reads_ids(verify, "completions", {"prompt": "q", "echo": True}, False)


# -- the router, end to end on the fake engine ----------------------------------------------
async def test_chat_verify_is_sent_on_the_replys_own_ids_plus_the_learned_tail() -> None:
    engine = ChatEngine()
    router, metrics = engine.router()
    res = await router.complete("r", "chat", {"model": "r", "messages": MESSAGES})
    body = res.body
    assert body is not None
    conf = body["choices"][0]["confidence"]
    assert conf["method"] == "verify" and conf["raw"] == pytest.approx(0.75)
    assert engine.fake.bodies[0]["return_token_ids"] is True
    prompt = engine.render(MESSAGES)
    reply = engine.vocab("paris")
    tail = [EOS, USER, *engine.vocab(VERIFY_QUESTION), END, ASSISTANT]
    (sent,) = engine.verifies()
    assert sent["prompt"] == prompt + reply + tail
    assert sent["max_tokens"] == 1 and "messages" not in sent
    # the same prompt the text path would have the engine render
    text_prompt = engine.render([*MESSAGES, {"role": "assistant", "content": "paris"},
                                 {"role": "user", "content": VERIFY_QUESTION}])
    assert sent["prompt"] == text_prompt
    probes = [b for b in engine.fake.bodies if b.get("return_token_ids") and
              b.get("max_tokens") == 1]
    assert {json.dumps(b.get("messages") or b.get("prompt")) for b in probes} == {
        json.dumps([{"role": "user", "content": PROBE_USER}]),
        json.dumps([{"role": "user", "content": PROBE_USER},
                    {"role": "assistant", "content": PROBE_REPLY},
                    {"role": "user", "content": VERIFY_QUESTION}]),
        json.dumps(PROBE_REPLY)}
    # learned once: a second request sends the main request and the verify request only
    before = len(engine.fake.bodies)
    await router.complete("r", "chat", {"model": "r", "messages": MESSAGES})
    assert len(engine.fake.bodies) - before == 2
    assert count(metrics, "verify", "ok") == 2


async def test_completions_verify_appends_the_suffix_ids() -> None:
    engine = ChatEngine(finish="length")
    router, _ = engine.router()
    await router.complete("r", "completions", {"model": "r", "prompt": "the capital is"})
    (sent,) = engine.verifies()
    assert sent["prompt"] == [0, *engine.vocab("the capital is paris"), *engine.vocab(
        VERIFY_SUFFIX)]


@pytest.mark.parametrize("engine", [
    ChatEngine(stop="\n"),  # a stop string cut the reply
    ChatEngine(template_ok=False),  # the template's tail cannot be read
    ChatEngine(ids=False),  # an engine that does not return ids
])
async def test_verify_keeps_the_text_prompt_when_ids_cannot_be_trusted(
    engine: ChatEngine
) -> None:
    router, metrics = engine.router()
    res = await router.complete("r", "chat", {"model": "r", "messages": MESSAGES})
    assert res.body is not None and res.body["choices"][0]["confidence"]["method"] == "verify"
    (sent,) = engine.verifies()
    assert "prompt" not in sent and sent["messages"][-1]["content"] == VERIFY_QUESTION
    assert count(metrics, "verify", "ok") == 1


async def test_a_failed_tail_lookup_is_retried_later(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ChatEngine()
    router, _ = engine.router()
    clock = [1000.0]
    monkeypatch.setattr(verify_tokens.time, "monotonic", lambda: clock[0])
    broken = True
    handle = engine.handle

    def flaky(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if broken and body.get("max_tokens") == 1 and body.get("return_token_ids"):
            return httpx.Response(500, json={"error": {"message": "down"}})
        return handle(request)

    engine.fake.steps = [flaky]
    body = {"model": "r", "messages": MESSAGES}
    await router.complete("r", "chat", body)
    assert "messages" in engine.verifies()[-1]  # text prompt
    broken = False
    await router.complete("r", "chat", body)
    assert "messages" in engine.verifies()[-1]  # not asked again yet
    clock[0] += verify_tokens.RETRY_AFTER_S + 1
    await router.complete("r", "chat", body)
    assert isinstance(engine.verifies()[-1]["prompt"], list)


async def test_mean_requests_ask_for_no_ids() -> None:
    engine = ChatEngine()
    router, _ = engine.router("mean")
    await router.complete("r", "chat", {"model": "r", "messages": MESSAGES})
    assert "return_token_ids" not in engine.fake.bodies[0]
    assert len(engine.fake.bodies) == 1


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_a_streamed_reply_is_verified_on_the_same_ids(endpoint: str) -> None:
    engine = ChatEngine(reply="the city of paris")
    router, _ = engine.router()
    ask: dict[str, Any] = ({"messages": MESSAGES} if endpoint == "chat"
                           else {"prompt": "the capital is"})
    whole = await router.complete("r", endpoint, {"model": "r", **ask})
    assert whole.body is not None
    confs = []
    async for item in router.stream("r", endpoint, {"model": "r", "stream": True, **ask}):
        if item.data is None:
            break
        confs += [c["confidence"] for c in item.data.get("choices") or [] if "confidence" in c]
    assert confs == [whole.body["choices"][0]["confidence"]]
    first, second = engine.verifies()
    assert isinstance(first["prompt"], list) and second["prompt"] == first["prompt"]
    assert [b.get("return_token_ids") for b in engine.fake.bodies if b.get("stream")] == [True]


def test_a_stream_with_a_malformed_ids_chunk_is_never_verified_on_ids() -> None:
    from calibserve.routing.tier_stream import _keep_ids

    ids: dict[str, Any] = {"token_ids": [], "message": {}}
    for delta in ([5], "6", [7]):
        _keep_ids(ids, {"token_ids": delta})
    _keep_ids(ids, {"token_ids": [8], "finish_reason": "length"})
    assert ids["token_ids"] is None
    assert reply_ids("chat", {"prompt_token_ids": [1]}, ids) is None

"""The fidelity corpus: request kinds replayed against vLLM directly and through calibserve.

`compare(kind, direct_base, proxy_base)` sends one kind to both and returns the differences left
after the allow-list (ALLOWED, documented in docs/internals.md "Fidelity"): calibserve's additions
(`confidence`, `calibserve`, the added summary chunk of a stream, `x-calibserve-*` headers) and
what differs between any two calls to vLLM itself (ids and creation times). Everything else, the
status, every field of the body and of every stream event, the content type, must be identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx

MODEL = "merged"
MC = "question : what is the color of ent1 ? A red B blue C green D gold"

# Allow-list. Keys dropped wherever they appear at these places:
ADDED_KEYS = {"confidence", "calibserve"}            # calibserve's documented additions
VOLATILE_TOP = {"id", "created", "created_at"}        # differ between two vLLM calls too
VOLATILE_ANYWHERE = {"item_id"}                       # Responses: per-call message ids
# Fields vLLM makes anew on every call, in objects of these `object` kinds: a model card's
# `created` (the time of the listing) and its permission entries' `id` and `created`.
VOLATILE_BY_OBJECT = {"model": {"created"}, "model_permission": {"id", "created"}}
# Responses: output items' `id` (msg_...) and a stream's `response.id` are per call as well.


@dataclass
class Kind:
    name: str
    path: str
    body: Any
    method: str = "POST"
    stream: bool = False
    # calibserve validated this itself (a type it reads): same status, type, param and code;
    # the message is its own.
    own_error: bool = False
    raw: bytes | None = None


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": MC}], "max_tokens": 4,
            "temperature": 0, **kw}


def comp(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": MC, "max_tokens": 4, "temperature": 0, **kw}


def resp(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": MC, "max_output_tokens": 4, "temperature": 0, **kw}


TOOL = {"type": "function", "function": {"name": "answer", "description": "give the answer",
        "parameters": {"type": "object", "properties": {"letter": {"type": "string"}}}}}
SCHEMA = {"type": "object", "properties": {"letter": {"type": "string", "enum": ["A", "B"]}},
          "required": ["letter"]}

CORPUS: list[Kind] = [
    # chat
    Kind("chat", "/v1/chat/completions", chat()),
    Kind("chat stream", "/v1/chat/completions", chat(stream=True), stream=True),
    Kind("chat stream usage", "/v1/chat/completions",
         chat(stream=True, stream_options={"include_usage": True}), stream=True),
    Kind("chat n=3 seed", "/v1/chat/completions", chat(n=3, temperature=1.0, seed=7)),
    Kind("chat n=2 stream seed", "/v1/chat/completions",
         chat(n=2, temperature=1.0, seed=3, stream=True), stream=True),
    Kind("chat logprobs top 2", "/v1/chat/completions", chat(logprobs=True, top_logprobs=2)),
    Kind("chat logprobs top 0", "/v1/chat/completions", chat(logprobs=True)),
    Kind("chat logprobs stream", "/v1/chat/completions",
         chat(logprobs=True, top_logprobs=1, stream=True), stream=True),
    Kind("chat prompt_logprobs 1", "/v1/chat/completions", chat(prompt_logprobs=1)),
    Kind("chat prompt_logprobs 0", "/v1/chat/completions", chat(prompt_logprobs=0)),
    Kind("chat echo", "/v1/chat/completions",
         chat(echo=True, logprobs=True, top_logprobs=1,
              messages=[{"role": "user", "content": MC},
                        {"role": "assistant", "content": "answer : B"}],
              add_generation_prompt=False)),
    Kind("chat stop", "/v1/chat/completions", chat(max_tokens=8, stop=["<|end|>", "B"])),
    Kind("chat seed t=1", "/v1/chat/completions", chat(temperature=1.0, seed=11, max_tokens=6)),
    Kind("chat max_tokens 0", "/v1/chat/completions", chat(max_tokens=0)),
    # JSON grammars (response_format json_schema / json_object) fail inside the engine with the
    # demo's word-level tokenizer (xgrammar rejects its tokens: vLLM answers 500): choice and
    # regex are the structured outputs this model supports. See ENGINE_5XX below.
    Kind("chat structured_outputs regex", "/v1/chat/completions",
         chat(structured_outputs={"regex": "(A|B|C|D)"})),
    Kind("chat structured_outputs choice", "/v1/chat/completions",
         chat(structured_outputs={"choice": ["A", "B", "C", "D"]})),
    Kind("chat tools, tool_choice none", "/v1/chat/completions",
         chat(tools=[TOOL], tool_choice="none")),
    Kind("chat tools, tool_choice auto (engine without a tool parser)",
         "/v1/chat/completions", chat(tools=[TOOL], tool_choice="auto")),
    Kind("chat tools, named tool_choice", "/v1/chat/completions",
         chat(max_tokens=12, tools=[TOOL],
              tool_choice={"type": "function", "function": {"name": "answer"}})),
    # completions
    Kind("completions", "/v1/completions", comp()),
    Kind("completions stream", "/v1/completions", comp(stream=True), stream=True),
    Kind("completions n=2 seed", "/v1/completions", comp(n=2, temperature=1.0, seed=5)),
    Kind("completions logprobs 2", "/v1/completions", comp(logprobs=2)),
    Kind("completions logprobs 0", "/v1/completions", comp(logprobs=0)),
    Kind("completions logprobs stream", "/v1/completions", comp(logprobs=1, stream=True),
         stream=True),
    Kind("completions echo logprobs 1", "/v1/completions", comp(echo=True, logprobs=1)),
    Kind("completions echo no logprobs", "/v1/completions", comp(echo=True)),
    Kind("completions echo stream", "/v1/completions",
         comp(echo=True, logprobs=2, stream=True), stream=True),
    Kind("completions prompt scoring (echo, max_tokens 0, logprobs 1)", "/v1/completions",
         comp(echo=True, max_tokens=0, logprobs=1)),
    Kind("completions prompt_logprobs 2", "/v1/completions", comp(prompt_logprobs=2)),
    Kind("completions stop", "/v1/completions", comp(max_tokens=8, stop=[" B"])),
    Kind("completions token-id prompt", "/v1/completions", comp(prompt=[1, 13, 14, 15])),
    Kind("completions batch prompts", "/v1/completions",
         comp(prompt=[MC, "question : what is it ?"])),
    Kind("completions batch token ids", "/v1/completions", comp(prompt=[[1, 13], [13, 14]])),
    Kind("completions structured_outputs regex", "/v1/completions",
         comp(structured_outputs={"regex": "(A|B)"})),
    # responses
    Kind("responses", "/v1/responses", resp()),
    Kind("responses logprobs", "/v1/responses",
         resp(include=["message.output_text.logprobs"], top_logprobs=2)),
    Kind("responses stream", "/v1/responses", resp(stream=True), stream=True),
    Kind("responses stream logprobs", "/v1/responses",
         resp(stream=True, include=["message.output_text.logprobs"], top_logprobs=1),
         stream=True),
    Kind("responses instructions + items", "/v1/responses",
         resp(instructions="be brief", input=[{"role": "user", "content": MC}])),
    # models: the engine's own cards
    Kind("models", "/v1/models", None, method="GET"),
    # engine routes passed through
    Kind("tokenize", "/tokenize", {"model": MODEL, "prompt": MC}),
    Kind("tokenize chat", "/tokenize", {"model": MODEL,
                                        "messages": [{"role": "user", "content": MC}]}),
    Kind("detokenize", "/detokenize", {"model": MODEL, "tokens": [13, 14, 15]}),
    Kind("version", "/version", None, method="GET"),
    Kind("unknown path", "/v1/nothing-here", None, method="GET"),
    # bad requests
    Kind("bad: unknown model", "/v1/chat/completions", chat(model="nope")),
    Kind("bad: unknown model (completions)", "/v1/completions", comp(model="nope")),
    Kind("bad: top_logprobs 50", "/v1/chat/completions", chat(logprobs=True, top_logprobs=50)),
    Kind("bad: max_tokens past the context", "/v1/completions", comp(max_tokens=1000)),
    Kind("bad: n = 0", "/v1/chat/completions", chat(n=0)),
    Kind("bad: temperature -1", "/v1/chat/completions", chat(temperature=-1)),
    Kind("bad: prompt_logprobs with stream", "/v1/completions",
         comp(prompt_logprobs=1, stream=True)),
    Kind("bad: responses top_logprobs 50", "/v1/responses",
         resp(include=["message.output_text.logprobs"], top_logprobs=50)),
    Kind("bad: max_tokens not an int", "/v1/completions", comp(max_tokens="x"), own_error=True),
    # An engine 5xx is the engine's answer too: its status and body, streaming or not.
    Kind("engine 500: chat json_schema (the demo tokenizer)", "/v1/chat/completions",
         chat(max_tokens=12, response_format={
             "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}})),
    # vLLM starts this stream (200, the role chunk) and ends it with its 500 error event.
    Kind("engine error event: chat json_schema stream", "/v1/chat/completions",
         chat(max_tokens=12, stream=True, response_format={
             "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}),
         stream=True),
    Kind("engine 500: completions json_object", "/v1/completions",
         comp(max_tokens=12, response_format={"type": "json_object"})),
]


@dataclass
class Answer:
    status: int
    content_type: str
    body: Any
    events: list[Any] = field(default_factory=list)


def send(client: httpx.Client, base: str, kind: Kind) -> Answer:
    kwargs: dict[str, Any] = {"timeout": 120}
    if kind.body is not None:
        kwargs["json"] = kind.body
    r = client.request(kind.method, base + kind.path, **kwargs)
    ctype = r.headers.get("content-type", "").split(";")[0]
    if ctype == "text/event-stream":
        events: list[Any] = []
        name = None
        for line in r.text.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
                events.append([name, data if data == "[DONE]" else json.loads(data)])
                name = None
        return Answer(r.status_code, ctype, None, events)
    try:
        body: Any = r.json()
    except ValueError:
        body = r.text
    return Answer(r.status_code, ctype, body)


def _clean(obj: Any, depth: int = 0) -> Any:
    if isinstance(obj, dict):
        out = {}
        volatile = VOLATILE_BY_OBJECT.get(obj.get("object"), set()) \
            if isinstance(obj.get("object"), str) else set()
        for k, v in obj.items():
            if k in ADDED_KEYS or k in VOLATILE_ANYWHERE or (depth == 0 and k in VOLATILE_TOP) \
                    or k in volatile:
                continue
            if k == "response" and isinstance(v, dict):  # a Responses stream event's object
                out[k] = _clean(v, 0)
            elif k == "output" and isinstance(v, list):  # Responses output items: msg ids
                out[k] = [_clean({kk: vv for kk, vv in i.items() if kk != "id"}, depth + 1)
                          if isinstance(i, dict) else i for i in v]
            elif k == "item" and isinstance(v, dict):
                out[k] = _clean({kk: vv for kk, vv in v.items() if kk != "id"}, depth + 1)
            else:
                out[k] = _clean(v, depth + 1)
        return out
    if isinstance(obj, list):
        return [_clean(v, depth + 1) for v in obj]
    return obj


def _added_summary(event: Any) -> bool:
    """calibserve's own last chunk of a chat/completions stream (allow-listed)."""
    return (isinstance(event, dict) and "calibserve" in event and event.get("choices") == []
            and "usage" not in event)


def normalise(answer: Answer, via_proxy: bool, own_error: bool) -> dict[str, Any]:
    body = answer.body
    if own_error and isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = {"error": {k: v for k, v in body["error"].items() if k != "message"}}
    events = [[name, _clean(data)] for name, data in answer.events
              if not (via_proxy and _added_summary(data))]
    return {"status": answer.status, "content_type": answer.content_type,
            "body": _clean(body), "events": fold(events)}


_CONCAT = ("content", "text", "reasoning_content")
_LOGPROB_LISTS = ("content", "tokens", "token_logprobs", "top_logprobs", "text_offset")


def fold(events: list[list[Any]]) -> Any:  # noqa: C901 - one pass over both stream kinds
    """A stream as what it says, not how it was cut into chunks.

    vLLM coalesces tokens into fewer chunks when its output is read slowly, and interleaves
    the chunks of n > 1 choices in no fixed order, so two identical generations can arrive cut
    differently. Compared instead: each choice's concatenated text and logprobs and its last
    value of every other field, every chunk-level field, the usage and the `[DONE]` end; for
    Responses streams, each event type's events with the text deltas concatenated and
    `sequence_number` (which counts the chunks) left out.
    """
    if not events:
        return events
    if any(name for name, _ in events):  # a Responses stream: named events
        out: list[Any] = []
        delta: dict[str, Any] | None = None
        for name, data in events:
            data = {k: v for k, v in data.items() if k != "sequence_number"} \
                if isinstance(data, dict) else data
            if name == "response.output_text.delta":
                if delta is None:
                    delta = {**data, "delta": "", "logprobs": []}
                    out.append([name, delta])
                delta["delta"] += data.get("delta") or ""
                delta["logprobs"] += data.get("logprobs") or []
            else:
                out.append([name, data])
        return out
    choices: dict[int, dict[str, Any]] = {}
    meta: dict[str, Any] = {}
    tail: list[Any] = []
    for _, data in events:
        if not isinstance(data, dict):
            tail.append(data)
            continue
        for key, value in data.items():
            if key != "choices":
                meta.setdefault(key, value)
                if key == "usage" and value is not None:
                    meta[key] = value
        for choice in data.get("choices") or []:
            idx = int(choice.get("index", 0))
            state = choices.setdefault(idx, {"text": "", "logprobs": {}})
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else choice
            for key in _CONCAT:
                if isinstance(delta.get(key), str):
                    state["text"] += delta[key]
            for key, value in choice.items():
                if key == "logprobs" and isinstance(value, dict):
                    for lk in _LOGPROB_LISTS:
                        if isinstance(value.get(lk), list):
                            state["logprobs"].setdefault(lk, []).extend(value[lk])
                elif key not in ("delta", "text", "index") and (
                        value is not None or key not in state):
                    state[key] = value
            if isinstance(delta, dict) and delta is not choice:
                for key, value in delta.items():
                    if key not in _CONCAT and value is not None:
                        state[f"delta.{key}"] = value
    return {"choices": choices, "meta": meta, "tail": tail}


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Field-by-field differences between two normalised answers."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'proxy' if k in b else 'direct'}")
            else:
                out.extend(diff(a[k], b[k], f"{path}.{k}"))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items direct, {len(b)} through calibserve"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {json.dumps(a)[:120]} != {json.dumps(b)[:120]}"]


STREAM_ATTEMPTS = 3


def compare(client: httpx.Client, kind: Kind, direct: str, proxy: str) -> list[str]:
    """The differences between the engine's answer and calibserve's, none when identical.

    A stream is tried up to STREAM_ATTEMPTS times, identical once is identical: how vLLM cuts
    a stream depends on how fast it is read, and its Responses stream does not keep every
    token's logprobs when it coalesces tokens into one delta (seen once in CI with the other
    core busy: one logprob entry direct, two through calibserve, the same text). A proxy that
    changes a stream changes it every time and still fails.
    """
    found: list[str] = []
    for _ in range(STREAM_ATTEMPTS if kind.stream else 1):
        a = normalise(send(client, direct, kind), False, kind.own_error)
        b = normalise(send(client, proxy, kind), True, kind.own_error)
        found = diff(a, b)
        if not found:
            return found
    return found

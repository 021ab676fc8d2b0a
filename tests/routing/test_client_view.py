"""routing.client_view: trimming the engine's answer to the rewritten request (`tier_body`,
`responses_body`) gives what the engine answers to the client's own request (vLLM's construction,
modelled here: first for one position, then for whole requests and streams; the same against a
real engine is the vLLM-marked fidelity test)."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from calibserve.routing.client_view import (
    OUTPUT_LOGPROBS,
    ClientView,
    ResponsesView,
    responses_body,
    tier_body,
)


def vllm_alternatives(vocab: int, sampled: int, k: int) -> dict[str, float]:
    """vLLM's alternatives at a position for `k`: the sampled token first, then the best k by
    rank (the sampled one not twice). Token r has rank r + 1."""
    out = {f"t{sampled}": -sampled - 0.5}
    for r in range(min(k, vocab)):
        out.setdefault(f"t{r}", -r - 0.5)
    return out


def chat_answer(vocab: int, sampled: list[int], k: int) -> dict[str, Any]:
    content = [{"token": f"t{s}", "logprob": -s - 0.5, "top_logprobs": [
        {"token": t, "logprob": lp} for t, lp in list(vllm_alternatives(vocab, s, k).items())[:k]]}
        for s in sampled]
    return {"index": 0, "logprobs": {"content": content}}


def completions_answer(vocab: int, sampled: list[int], k: int) -> dict[str, Any]:
    return {"index": 0, "logprobs": {
        "tokens": [f"t{s}" for s in sampled],
        "token_logprobs": [-s - 0.5 for s in sampled],
        "top_logprobs": [vllm_alternatives(vocab, s, k) for s in sampled]}}


positions = st.integers(2, 12).flatmap(lambda v: st.tuples(
    st.just(v), st.lists(st.integers(0, v - 1), min_size=1, max_size=4),
    st.integers(0, v)).flatmap(lambda t: st.tuples(st.just(t), st.integers(0, t[2]))))


@given(positions)
def test_chat_trimmed_is_the_engines_answer_to_the_clients_request(case: Any) -> None:
    (vocab, sampled, asked), client_k = case
    choice = chat_answer(vocab, sampled, asked)  # what the router asked for
    ClientView("chat", {"logprobs": True, "top_logprobs": client_k}).apply(choice)
    assert choice == chat_answer(vocab, sampled, client_k)


@given(positions)
def test_completions_trimmed_is_the_engines_answer_to_the_clients_request(case: Any) -> None:
    (vocab, sampled, asked), client_k = case
    choice = completions_answer(vocab, sampled, asked)
    ClientView("completions", {"logprobs": client_k}).apply(choice)
    assert choice == completions_answer(vocab, sampled, client_k)


def test_logprobs_not_asked_for_are_removed_and_token_ids_nulled() -> None:
    choice = {**chat_answer(6, [3], 5), "token_ids": [1, 2]}
    ClientView("chat", {}).apply(choice)
    assert choice["logprobs"] is None and choice["token_ids"] is None
    choice = {**completions_answer(6, [3], 5), "token_ids": [1, 2]}
    ClientView("completions", {"return_token_ids": True}).apply(choice)
    assert choice["logprobs"] is None and choice["token_ids"] == [1, 2]


# -- the whole round trip: client request -> tier_body -> engine -> ClientView ------------------
#
# `engine` is a small deterministic stand-in for vLLM that honours a request's logprobs fields the
# way vLLM does (module docstring of routing/client_view.py): the answer's alternatives per token
# (`vllm_alternatives`; chat lists the first k), the prompt's (`prompt_logprobs`, else with `echo`
# the answer's value), token ids when asked (and, in an echoed stream, always), one chunk per
# token and choice when streamed, a usage chunk when asked. Trimming its answer to the rewritten
# request must give exactly its answer to the client's own request.

VOCAB = 8
PROMPT = [3, 0, 6]


def engine_prompt_k(endpoint: str, body: dict[str, Any]) -> int | None:
    if body.get("prompt_logprobs") is not None:
        return int(body["prompt_logprobs"])
    if not body.get("echo"):
        return None
    value = body.get("top_logprobs", 0) if endpoint == "chat" else body.get("logprobs")
    return None if value is None else int(value)


def engine_answer_k(endpoint: str, body: dict[str, Any]) -> int | None:
    """Alternatives per answer token, None for no logprobs."""
    if endpoint == "chat":
        return int(body.get("top_logprobs") or 0) if body.get("logprobs") else None
    return None if body.get("logprobs") is None else int(body["logprobs"])


def prompt_entries(k: int) -> list[Any]:
    """vLLM's `prompt_logprobs`: None for the first token, then the token first and every
    other token of rank <= k."""
    out: list[Any] = [None]
    for p in PROMPT[1:]:
        entry = {str(p): {"logprob": -p - 0.5, "rank": p + 1, "decoded_token": f"t{p}"}}
        for r in range(min(k, VOCAB)):
            entry.setdefault(str(r), {"logprob": -r - 0.5, "rank": r + 1, "decoded_token": f"t{r}"})
        out.append(entry)
    return out


def chat_entry(s: int, k: int) -> dict[str, Any]:
    return {"token": f"t{s}", "logprob": -s - 0.5, "top_logprobs": [
        {"token": t, "logprob": lp} for t, lp in list(vllm_alternatives(VOCAB, s, k).items())[:k]]}


def engine(endpoint: str, body: dict[str, Any], sampled: list[int]) -> Any:
    """The engine's answer to `body`: a JSON object, or the list of its stream's chunks."""
    n = int(body.get("n") or 1)
    stream = bool(body.get("stream"))
    ids = bool(body.get("return_token_ids")) or (stream and bool(body.get("echo")))
    prompt_k = engine_prompt_k(endpoint, body)
    k = engine_answer_k(endpoint, body)

    def tokens(i: int) -> list[int]:
        return [(s + i) % VOCAB for s in sampled]

    def logprobs(toks: list[int], echo: bool) -> dict[str, Any] | None:
        if k is None:
            return None
        if endpoint == "chat":
            return {"content": [chat_entry(s, k) for s in toks]}
        lp: dict[str, Any] = {"tokens": [f"t{s}" for s in toks],
                              "token_logprobs": [-s - 0.5 for s in toks],
                              "top_logprobs": [vllm_alternatives(VOCAB, s, k) for s in toks]}
        if echo:  # the prompt's positions lead, from its prompt logprobs cut to the answer's k
            pk = prompt_k if prompt_k is not None else k
            heads = [None] + [dict(list(vllm_alternatives(VOCAB, p, pk).items())[:k + 1])
                              for p in PROMPT[1:]]
            lp = {"tokens": [f"t{p}" for p in PROMPT] + lp["tokens"],
                  "token_logprobs": [None] + [-p - 0.5 for p in PROMPT[1:]]
                  + lp["token_logprobs"],
                  "top_logprobs": heads + lp["top_logprobs"]}
        return lp

    def choice(i: int, toks: list[int], echo: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"index": i, "logprobs": logprobs(toks, echo),
                               "token_ids": toks if ids else None}
        if endpoint == "chat":
            out["delta" if stream else "message"] = {"content": "".join(f"t{s}" for s in toks)}
        else:
            out["text"] = "".join(f"t{s}" for s in toks)
            if echo or not stream:
                out["prompt_logprobs"] = None if prompt_k is None else prompt_entries(prompt_k)
                out["prompt_token_ids"] = PROMPT if ids else None
        return out

    echo = endpoint == "completions" and bool(body.get("echo"))
    head: dict[str, Any] = {"id": "x", "model": body["model"]}
    if not stream:
        answer = {**head, "choices": [choice(i, tokens(i), echo) for i in range(n)]}
        if endpoint == "chat":
            answer["prompt_logprobs"] = None if prompt_k is None else prompt_entries(prompt_k)
            answer["prompt_token_ids"] = PROMPT if ids else None
        return answer
    chunks: list[dict[str, Any]] = []
    for pos in range(len(sampled)):
        for i in range(n):
            chunk = {**head, "choices": [choice(i, tokens(i)[pos:pos + 1], echo and pos == 0)]}
            if endpoint == "chat" and pos == 0 and i == 0:
                chunk["prompt_token_ids"] = PROMPT if ids else None
            chunks.append(chunk)
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append({**head, "choices": [], "usage": {"prompt_tokens": len(PROMPT)}})
    return chunks


@st.composite
def client_requests(draw: st.DrawFn) -> tuple[str, dict[str, Any], int, bool, list[int]]:
    endpoint = draw(st.sampled_from(["chat", "completions"]))
    body: dict[str, Any] = {"model": "m"}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "q"}]
        if draw(st.booleans()):
            body["logprobs"] = draw(st.booleans())
        if draw(st.booleans()):
            body["top_logprobs"] = draw(st.integers(0, 20))
        body["echo"] = draw(st.booleans())
    else:
        body["prompt"] = "q"
        if draw(st.booleans()):
            body["logprobs"] = draw(st.integers(0, 20))
        body["echo"] = draw(st.booleans())
    stream = draw(st.booleans())
    if stream:
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": draw(st.booleans())}
    if draw(st.booleans()):
        body["n"] = draw(st.integers(1, 3))
    # vLLM refuses prompt_logprobs with stream; with echo they would lead the answer's logprobs
    if not stream and not body.get("echo") and draw(st.booleans()):
        body["prompt_logprobs"] = draw(st.integers(0, 20))
    token_ids = not body.get("echo") and draw(st.booleans())  # payload.verify_reads_ids
    if draw(st.booleans()):
        body["return_token_ids"] = True
    top = draw(st.integers(0, 20))  # what the tier's confidence methods read
    sampled = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4))
    return endpoint, body, top, token_ids, sampled


@settings(max_examples=400, deadline=None)
@given(client_requests())
def test_trimming_the_answer_to_the_rewritten_request_gives_the_answer_to_the_original(
        case: tuple[str, dict[str, Any], int, bool, list[int]]) -> None:
    endpoint, body, top, token_ids, sampled = case
    original = copy.deepcopy(body)
    sent = tier_body(endpoint, body, "m", stream=bool(body.get("stream")), top_logprobs=top,
                     token_ids=token_ids)
    assert body == original  # the client's body is not touched
    got = engine(endpoint, sent, sampled)
    view = ClientView(endpoint, body)
    if isinstance(got, list):
        for chunk in got:
            view.chunk(chunk)
    else:
        view.answer(got)
    assert got == engine(endpoint, body, sampled)


def responses_engine(body: dict[str, Any], sampled: list[int]) -> Any:
    """The engine's `/v1/responses` answer: output_text logprobs (each token's first k
    alternatives) when `include` asks for them, else null (a finished part) or [] (a delta);
    the response echoes the `top_logprobs` its sampling used. Streams: a created event, one
    delta per token, the completed response."""
    want = OUTPUT_LOGPROBS in (body.get("include") or [])
    k = int(body.get("top_logprobs") or 0)
    entries = [chat_entry(s, k) for s in sampled] if want else None
    part = {"type": "output_text", "text": "".join(f"t{s}" for s in sampled),
            "logprobs": entries}
    response = {"id": "resp", "model": body["model"],
                "top_logprobs": body.get("top_logprobs", 0) if want else None,
                "output": [{"type": "message", "content": [part]}]}
    if not body.get("stream"):
        return response
    return [{"type": "response.created", "response": {**response, "output": []}}] + [
        {"type": "response.output_text.delta", "delta": f"t{s}",
         "logprobs": [chat_entry(s, k)] if want else []} for s in sampled] + [
        {"type": "response.completed", "response": response}]


@st.composite
def responses_requests(draw: st.DrawFn) -> tuple[dict[str, Any], int, list[int]]:
    body: dict[str, Any] = {"model": "m", "input": "q"}
    include = draw(st.lists(st.sampled_from([OUTPUT_LOGPROBS, "reasoning.encrypted_content"]),
                            unique=True))
    if include or draw(st.booleans()):
        body["include"] = include
    if draw(st.booleans()):
        body["top_logprobs"] = draw(st.integers(0, 20))
    if draw(st.booleans()):
        body["stream"] = True
    top = draw(st.integers(0, 20))
    return body, top, draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4))


@settings(max_examples=200, deadline=None)
@given(responses_requests())
def test_responses_trimmed_is_the_engines_answer_to_the_original(
        case: tuple[dict[str, Any], int, list[int]]) -> None:
    body, top, sampled = case
    original = copy.deepcopy(body)
    sent = responses_body(body, "m", top)
    assert body == original
    got = responses_engine(sent, sampled)
    view = ResponsesView(body)
    if isinstance(got, list):
        for event in got:
            view.event(event)
    else:
        view.response(got)
    assert got == responses_engine(body, sampled)

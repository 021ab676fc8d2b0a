"""routing.payload and the request rewrite of routing.client_view: what a tier's upstream is
asked for (only the logprobs its confidence methods read), and the Responses helpers (the
engine's body; the chat request asking the same)."""

from __future__ import annotations

import pytest

from calibserve.calibration import CalibrationDocument, Scorer
from calibserve.routing.client_view import OUTPUT_LOGPROBS, responses_body, tier_body
from calibserve.routing.payload import (
    MIN_TOP_LOGPROBS,
    options_offered,
    responses_chat,
    tier_top_logprobs,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def scorer(multiple_choice: str, free_form: str) -> Scorer:
    methods: dict[str, dict[str, object]] = {multiple_choice: {}, free_form: {}}
    return Scorer.from_document(CalibrationDocument.from_dict({
        "version": 2, "methods": methods, "multiple_choice": multiple_choice,
        "free_form": free_form}))


@pytest.mark.parametrize(("multiple_choice", "free_form", "top"), [
    ("answer", "mean", 5),  # the first token's alternatives (option letters)
    ("mean", "mean", 0),  # token statistics: the sampled tokens' own logprobs
    ("min", "quantile", 0),
    ("mean", "verify", 0),  # verify's main request: only what its fallback (mean) reads
    ("answer", "verify", 5),
])
def test_the_upstream_is_asked_only_for_what_the_methods_read(
        multiple_choice: str, free_form: str, top: int) -> None:
    assert tier_top_logprobs(scorer(multiple_choice, free_form)) == top
    sent = tier_body("chat", CHAT, "up", stream=False, top_logprobs=top)
    assert sent["logprobs"] is True and sent["top_logprobs"] == top
    sent = tier_body("completions", {"model": "m", "prompt": "p"}, "up", stream=False,
                     top_logprobs=top)
    assert sent["logprobs"] == top


def test_a_prompt_without_options_is_not_asked_for_the_option_letters() -> None:
    """`answer` reads the first token's alternatives only for a prompt that lists options."""
    s = scorer("answer", "mean")
    mc = {"model": "m", "messages": [{"role": "user", "content": "q ? A x B y C z D w"}]}
    assert options_offered("chat", mc, s) is True
    assert options_offered("chat", CHAT, s) is False
    assert options_offered("completions", {"prompt": [1, 2]}, s) is None  # token ids: unknown
    assert tier_top_logprobs(s, True) == 5 and tier_top_logprobs(s, None) == 5
    assert tier_top_logprobs(s, False) == 0
    # A multiple-choice method that reads no letters scores every reply: always asked for.
    assert tier_top_logprobs(scorer("mean", "mean"), False) == 0


def test_never_fewer_than_the_client_asked_for() -> None:
    sent = tier_body("chat", {**CHAT, "logprobs": True, "top_logprobs": 7}, "up", stream=True,
                     top_logprobs=0)
    assert sent["top_logprobs"] == 7 and sent["stream"] is True
    sent = tier_body("completions", {"model": "m", "prompt": "p", "logprobs": 3}, "up",
                     stream=False, top_logprobs=0)
    assert sent["logprobs"] == 3


def test_a_scorer_that_does_not_name_its_methods_gets_the_safe_default() -> None:
    assert tier_top_logprobs(object()) == MIN_TOP_LOGPROBS
    assert tier_body("chat", CHAT, "up", stream=False)["top_logprobs"] == MIN_TOP_LOGPROBS


def test_responses_body_forces_output_logprobs_and_keeps_the_clients_ask() -> None:
    assert responses_body({"model": "a", "input": "q"}, "engine") == {
        "model": "engine", "input": "q", "include": [OUTPUT_LOGPROBS], "top_logprobs": 5}
    asked = responses_body({"model": "a", "input": "q", "include": [OUTPUT_LOGPROBS],
                            "top_logprobs": 9}, "engine")
    assert asked["include"] == [OUTPUT_LOGPROBS] and asked["top_logprobs"] == 9
    # A tier whose methods read no alternatives (token statistics) asks the engine for none.
    assert responses_body({"model": "a", "input": "q"}, "engine", 0)["top_logprobs"] == 0
    assert responses_body({"model": "a", "input": "q", "include": [OUTPUT_LOGPROBS],
                           "top_logprobs": 2}, "engine", 0)["top_logprobs"] == 2


def test_responses_chat_rephrases_instructions_and_message_items() -> None:
    body = {"model": "a", "instructions": "be brief", "temperature": 0.3,
            "max_output_tokens": 7, "stream": True, "include": [OUTPUT_LOGPROBS],
            "input": [{"role": "user", "content": "hi"},
                      {"type": "message", "role": "assistant",
                       "content": [{"type": "output_text", "text": "hel"},
                                   {"type": "output_text", "text": "lo"}]},
                      {"role": "user", "content": [{"type": "input_text", "text": "q?"}]}]}
    assert responses_chat(body) == {
        "model": "a", "temperature": 0.3, "max_tokens": 7,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"},
                     {"role": "user", "content": "q?"}]}
    assert responses_chat({"model": "a", "input": "q"})["messages"] == [
        {"role": "user", "content": "q"}]


def test_input_it_cannot_rephrase_leaves_messages_out() -> None:
    for value in ([{"type": "function_call_output", "call_id": "c", "output": "x"}],
                  [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}],
                  [], None, 3):
        assert "messages" not in responses_chat({"model": "a", "input": value}), value

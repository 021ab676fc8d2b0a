"""routing.payload's Responses helpers: the engine's body and the chat request asking the same."""

from __future__ import annotations

from calibserve.routing.payload import OUTPUT_LOGPROBS, responses_body, responses_chat


def test_responses_body_forces_output_logprobs_and_keeps_the_clients_ask() -> None:
    assert responses_body({"model": "a", "input": "q"}, "engine") == {
        "model": "engine", "input": "q", "include": [OUTPUT_LOGPROBS], "top_logprobs": 5}
    asked = responses_body({"model": "a", "input": "q", "include": [OUTPUT_LOGPROBS],
                            "top_logprobs": 9}, "engine")
    assert asked["include"] == [OUTPUT_LOGPROBS] and asked["top_logprobs"] == 9


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

"""Which prompts offer lettered options (`offers_options`), and what text a request asks about."""

from __future__ import annotations

import time

import pytest

from calibserve.calibration.mc_prompt import format_mc_prompt, offers_options, prompt_text

ITEM = {"question": "capital of france ?", "choices": ["paris", "rome", "oslo"], "answer": 0}


@pytest.mark.parametrize("text", [
    format_mc_prompt(ITEM),  # the eval contract: question : q A x B y C z
    "capital of france?\n\nA. paris\nB. rome\nC. oslo\n\nReply with the letter.",
    "capital of france? (A) paris (B) rome",
    "capital of france?\nA) paris\nB) rome",
    "capital of france? A: paris B: rome",
    "Options:\n[A] paris\n[B] rome",
    "capital of france? A paris B rome C oslo",  # bare letters: three in order
    "question : is the sky blue ? A yes B no",  # bare, two: the contract wording's opening
    "Question: Is the sky blue? A yes B no",  # the opening in any case
    "<|user|> question : is the sky blue ? A yes B no <|assistant|> answer :",  # a rendered chat
    "vitamin A and (A) paris (B) rome",  # a bare A earlier does not hide the listed ones
])
def test_prompts_that_list_options(text: str) -> None:
    assert offers_options(text)


@pytest.mark.parametrize("text", [
    "hello",
    "capital of france ?",
    "Is A bigger than B?",  # no option follows either letter
    "vitamin B and vitamin A",  # out of order
    "A,B",
    "Answer A.",  # one letter is not a list
    "what is the difference between vitamin A and vitamin B ?",  # bare letters are words too
    "how long is it from point A to point B by car ?",
    "A. paris B) rome",  # two letters written two ways are not one list
    "capital of france? A paris B rome",  # two bare letters without the contract's opening
    "A paris B rome. question : which ?",  # the opening must come before the options
    "",
])
def test_prompts_that_do_not(text: str) -> None:
    assert not offers_options(text)


def test_long_prompts_stay_cheap() -> None:
    # Thousands of "A"s with no B: each style's first A is tried once, not every A.
    text = "A lot of text about A. " * 5000
    started = time.perf_counter()
    assert not offers_options(text)
    assert time.perf_counter() - started < 0.5  # quadratic scanning took minutes
    assert offers_options(text + "\nA. one\nB. two")


def test_the_documents_own_letters_are_what_count() -> None:
    text = format_mc_prompt(ITEM)
    assert not offers_options(text, ("W", "X", "Y", "Z"))
    assert offers_options("q ? W. one X. two", ("W", "X", "Y", "Z"))
    assert offers_options("q ? W one X two Y three", ("W", "X", "Y", "Z"))
    assert offers_options("q ? A x B y", ("A", "B"))  # a two-letter scorer: two bare suffice
    assert not offers_options(text, ("A",))  # fewer than two options: never


def test_prompt_text_of_chat_and_completions() -> None:
    chat = {"messages": [{"role": "system", "content": "A. be brief B. be kind"},
                         {"role": "user", "content": "first"},
                         {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": [{"type": "text", "text": "q ?"},
                                                      {"type": "image_url", "image_url": {}},
                                                      {"type": "text", "text": "A x B y"}]}]}
    assert prompt_text("chat", chat) == "q ?\nA x B y"  # the last user turn, text parts only
    assert prompt_text("chat", {"messages": [{"role": "system", "content": "x"}]}) is None
    assert prompt_text("chat", {"messages": "nope"}) is None
    assert prompt_text("completions", {"prompt": "q : A x B y"}) == "q : A x B y"
    assert prompt_text("completions", {"prompt": ["one", "two"]}) == "one\ntwo"
    assert prompt_text("completions", {"prompt": [1, 2, 3]}) is None  # token ids: unknown

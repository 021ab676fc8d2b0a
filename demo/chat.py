"""The demo world's chat format: prompt text, special tokens and the Jinja chat template.

The format is a contract shared with merge/ and benchmarks/ (see docs/internals.md): a user
message `question : {question} A {c0} B {c1} ...` rendered as `<|user|> {content}`, and a
generation prompt that ends with `<|assistant|> answer :` so the next token is the answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SYSTEM = "<|system|>"
END = "<|end|>"
PAD = "<pad>"
UNK = "<unk>"
SPECIAL_TOKENS = (PAD, UNK, END, USER, ASSISTANT, SYSTEM)
LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H")
ANSWER_PREFIX = "answer :"

# Every turn is rendered with single spaces between words, matching the word-level tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM + " {{ message['content'] }} "
    "{% elif message['role'] == 'user' %}" + USER + " {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}"
    + ASSISTANT + " " + ANSWER_PREFIX + " {{ message['content'] }} " + END + " "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + " " + ANSWER_PREFIX + "{% endif %}"
)


def format_mc_prompt(item: Mapping[str, Any]) -> str:
    """The user content for a multiple-choice item (`question`, `choices`)."""
    choices: Sequence[str] = item["choices"]
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    parts = [f"question : {item['question']}"]
    parts += [f"{LETTERS[i]} {choice}" for i, choice in enumerate(choices)]
    return " ".join(parts)


def render_prompt(user_content: str) -> str:
    """What the chat template renders for one user turn with the generation prompt."""
    return f"{USER} {user_content} {ASSISTANT} {ANSWER_PREFIX}"


def render_exchange(user_content: str, reply: str) -> str:
    """A full single-turn exchange as the model is trained on it."""
    return f"{render_prompt(user_content)} {reply} {END}"

"""How a multiple-choice item is asked: the one user message merge's evaluator, `calibserve
calibrate` and the server's probes send for `{"question", "choices", "answer"}`.

The default wording is the contract of docs/internals.md, `question : {question} A {c0} B {c1} ...`
(one space between words; the demo world's models are trained on it, and demo/chat.py keeps a copy
that tests/test_contracts.py holds equal, since the demo imports nothing of ours). An item may
carry its own wording in `"prompt"` (a string, sent verbatim as the user message; `choices` and
`answer` still say which letter is right): real instruction-tuned models answer the bare contract
wording with words as often as with a letter, so calibration data for them is usually worded the
way their traffic is, e.g. ending in "Answer with the letter of the correct option."

`offers_options` is how the server tells a prompt that offers lettered options from one that does
not: only a reply to such a prompt is scored by the option-letter method (or, when it names no
letter, by `no_letter`); a reply to any other prompt gets the free-form method, whatever its first
token (a "B" after "hello" is not the answer to a multiple-choice question). The rule, a
heuristic for the wordings seen in practice (`question : q A x B y`, `A. x` / `(A) x` / `A) x` /
`A: x` on lines of their own): the first two option letters each appear as a word of their own
(after whitespace or an opening bracket, followed by whitespace or by one of `.):]` and
whitespace), the second after the first. "vitamin A and vitamin B" can pass it; a prompt that
does not list them cannot.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

__all__ = ["LETTERS", "format_mc_prompt", "offers_options", "prompt_text"]

LETTERS: tuple[str, ...] = ("A", "B", "C", "D", "E", "F", "G", "H")


def format_mc_prompt(item: Mapping[str, Any]) -> str:
    """The user message for a multiple-choice item: its `prompt` if it has one, else the
    contract wording built from `question` and `choices`."""
    prompt = item.get("prompt")
    if isinstance(prompt, str):
        return prompt
    choices: Sequence[str] = item["choices"]
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    parts = [f"question : {item['question']}"]
    parts += [f"{LETTERS[i]} {choice}" for i, choice in enumerate(choices)]
    return " ".join(parts)


@lru_cache(maxsize=16)
def _marker(letter: str) -> re.Pattern[str]:
    return re.compile(rf"(?:^|(?<=[\s(\[])){re.escape(letter)}(?=[.):\]]?(?:\s|$))")


def offers_options(text: str, options: Sequence[str] = LETTERS[:4]) -> bool:
    """Does `text` list lettered options (the module docstring's rule)? Fewer than two
    `options`: never."""
    if len(options) < 2:
        return False
    first = _marker(str(options[0])).search(text)
    return first is not None and _marker(str(options[1])).search(text, first.end()) is not None


def prompt_text(endpoint: str, body: Mapping[str, Any]) -> str | None:
    """The text a request asks about: chat, the last user message (its text parts joined);
    completions, the prompt (a list of strings joined). None when it cannot be read as text
    (token ids, no user message)."""
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        for message in reversed(messages):
            if isinstance(message, Mapping) and message.get("role") == "user":
                return _content_text(message.get("content"))
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    return None


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, Mapping)]
        return "\n".join(p for p in parts if isinstance(p, str))
    return None

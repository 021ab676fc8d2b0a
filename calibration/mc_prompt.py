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
heuristic for the wordings seen in practice: option letters stand as words of their own (at the
start or after whitespace), in the scorer's order, each written the same way. Written with a
mark (`A. x`, `A) x`, `(A) x`, `[A] x`, `A: x`, usually on lines of their own), the first two
letters are enough. Written bare, as in the contract wording `question : q A x B y C z`, a bare
letter is also an ordinary word ("from point A to point B", "vitamin A and vitamin B"), so bare
letters count only as the first three options in order, or the first two after the contract's
opening `question :` (any case; a scorer with only two letters needs only those two, bare or
not). "vitamin A, vitamin B and vitamin C" still passes; a prompt
that does not list them cannot.
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


# An option letter as a word: at the start or after whitespace, an optional opening bracket,
# the letter, an optional closing mark, then whitespace or the end.
_OPEN, _CLOSE = r"[(\[]", r"[.):\]]"
# The contract wording's opening, as a word anywhere (a completions prompt may carry a rendered
# chat template before it; users write "Question:").
_CONTRACT_OPENING = re.compile(r"(?:^|(?<=\s))question\s*:", re.IGNORECASE)


@lru_cache(maxsize=64)
def _marker(letter: str, style: tuple[str, str] | None = None) -> re.Pattern[str]:
    """`letter` as an option marker; `style` (opening, closing mark) pins how it is written,
    None matches any style (the groups `open` and `close` say which)."""
    if style is None:
        opening, closing = f"(?P<open>{_OPEN}?)", f"(?P<close>{_CLOSE}?)"
    else:
        opening, closing = re.escape(style[0]), re.escape(style[1])
    return re.compile(rf"(?:^|(?<=\s)){opening}{re.escape(letter)}{closing}(?=\s|$)")


def offers_options(text: str, options: Sequence[str] = LETTERS[:4]) -> bool:
    """Does `text` list lettered options (the module docstring's rule)? Fewer than two
    `options`: never."""
    if len(options) < 2:
        return False
    letters = [str(o) for o in options]
    tried: set[tuple[str, str]] = set()
    for first in _marker(letters[0]).finditer(text):
        style = (first["open"], first["close"])
        if style in tried:  # a later first letter of a style tried already cannot do better
            continue
        tried.add(style)
        bare = style == ("", "")
        opened = _CONTRACT_OPENING.search(text, 0, first.start()) is not None
        needed = letters[1:3] if bare and not opened else letters[1:2]
        if _listed(text, needed, style, first.end()):
            return True
    return False


def _listed(text: str, letters: Sequence[str], style: tuple[str, str], at: int) -> bool:
    """Do `letters` follow in order from `at`, each written in `style`?"""
    for letter in letters:
        found = _marker(letter, style).search(text, at)
        if found is None:
            return False
        at = found.end()
    return True


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

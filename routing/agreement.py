"""Did the primary's answer agree with the stronger tier's? A label-free accuracy estimate.

Escalated requests are exactly the primary's low-confidence ones, so the agreement rate of the
primary with the expert estimates the primary's accuracy there without any user feedback.
Multiple-choice answers are compared by option letter; anything else by normalised text
(case, punctuation and whitespace ignored).
"""

from __future__ import annotations

import re
from typing import Any

# A bare option letter ("B", "(B)", "B.") or one that introduces the option ("B) blue", "B: ...").
_LETTER = re.compile(r"^\(?([A-Z])\)?[.:)]?$|^\(?([A-Z])[.:)]\s")
_ANSWER_IS = re.compile(r"^(?:the\s+)?answer\s*(?:is)?\s*[:=]?\s*", re.IGNORECASE)
_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


def choice_text(choice: dict[str, Any]) -> str:
    """The text of a non-streaming choice (chat `message.content` or completions `text`)."""
    message = choice.get("message")
    if isinstance(message, dict):
        return str(message.get("content") or "")
    return str(choice.get("text") or "")


def normalise(text: str) -> str:
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def option_letter(text: str) -> str | None:
    """The MC option letter an answer names, if it is one."""
    stripped = _ANSWER_IS.sub("", text.strip(), count=1).strip()
    match = _LETTER.match(stripped)
    if match is None:
        return None
    return match.group(1) or match.group(2)


def answers_agree(primary: str, other: str, *, primary_complete: bool = True) -> bool | None:
    """True/False when comparable; None when the primary's text is only a prefix of its answer."""
    a, b = option_letter(primary), option_letter(other)
    if a is not None and b is not None:
        return a == b
    if not primary_complete:
        return None
    return normalise(primary) == normalise(other)

"""Did the primary's answer agree with the stronger tier's? A label-free accuracy estimate.

Escalated requests are exactly the primary's low-confidence ones, so the agreement rate of the
primary with the expert estimates the primary's accuracy there without any user feedback.
Multiple-choice answers are compared by option letter; anything else by normalised text
(case, punctuation and whitespace ignored).
"""

from __future__ import annotations

import re
import string
from typing import Any

from calibserve.calibration.answers import option_letter as letter_of

_CAPITALS = tuple(string.ascii_uppercase)
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


def named_letter(text: str) -> str | None:
    """The MC option letter an answer names, if it is one: after an optional "the answer is",
    calibration's `option_letter` (the leading standalone capital: "B", "(B)", "B. blue")."""
    return letter_of(_ANSWER_IS.sub("", text.strip(), count=1), _CAPITALS)


def answers_agree(primary: str, other: str, *, primary_complete: bool = True) -> bool | None:
    """True/False when comparable; None when the primary's text is only a prefix of its answer."""
    a, b = named_letter(primary), named_letter(other)
    if a is not None and b is not None:
        return a == b
    if not primary_complete:
        return None
    return normalise(primary) == normalise(other)

"""Grading short answers: the documented normalised match, and the protocol for other graders.

`normalize_answer` lower-cases, deletes punctuation and the English articles (a, an, the) and
collapses whitespace, as the official SQuAD v1.1 scorer does (after Unicode NFKC). `exact_match`
is right when the normalised reply equals the normalised gold or any alias. The same
normalisation decides whether two sampled answers agree (`consistency`), so the grader that labels
the calibration data and the confidence that is served share one notion of "the same answer".

Users with their own notion of correct (numbers with units, code, a judge model) pass any
callable `(reply, gold, aliases) -> bool` wherever a `Grader` is accepted.

A reply to a multiple-choice prompt is graded by the option it names with its leading letter
(`option_letter`: "B", " B.", "B) ...", "(B)", "**B**"); a reply that starts with a word names no
option and is wrong, which is what the `no_letter` method's map is fitted on.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from typing import Protocol

from calibserve.calibration.mc_prompt import LETTERS

__all__ = ["Grader", "normalize_answer", "exact_match", "option_letter"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class Grader(Protocol):
    """Is `reply` a correct answer, given the gold answer and its aliases?"""

    def __call__(self, reply: str, gold: str, aliases: Sequence[str] = ()) -> bool: ...


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (Unicode NFKC first)."""
    t = unicodedata.normalize("NFKC", text).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", t).split())


def exact_match(reply: str, gold: str, aliases: Sequence[str] = ()) -> bool:
    """The default grader: the normalised reply equals the normalised gold or an alias."""
    got = normalize_answer(reply)
    return bool(got) and any(got == normalize_answer(g) for g in (gold, *aliases))


def option_letter(reply: str, options: Sequence[str] = LETTERS) -> str | None:
    """The option `reply` names by its leading letter (after whitespace and any of `(*[`), when
    the letter stands alone (end of reply, or followed by a non-alphanumeric); else None."""
    text = reply.strip().lstrip("(*[")
    for option in sorted(options, key=len, reverse=True):
        rest = text[len(option):]
        if option and text.startswith(option) and (not rest or not rest[0].isalnum()):
            return option
    return None

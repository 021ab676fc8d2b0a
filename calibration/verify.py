"""`verify` confidence (P(True), Kadavath et al. 2022): ask the model whether its reply is right.

The server sends one extra, prompt-only request to the same engine: the original conversation,
the reply as the assistant's turn, then `VERIFY_QUESTION` as a user turn (chat), or the prompt,
the reply and `VERIFY_SUFFIX` (completions), with `max_tokens: 1` and the first token's top
logprobs. The prompt starts with the original request's prompt, so vLLM's prefix cache serves
that part: the extra cost is roughly one prefill of the reply and the question, plus one token.

The confidence is P(yes) renormalised over the yes/no tokens among those top logprobs (all
spellings that normalise to "yes" or "no" add up). When neither appears, the model gave no
verdict: `verify_confidence` raises `NoVerdictError` and the caller falls back to another method.

A tokenizer with no single token that reads as yes, or none that reads as no (a small word-level
vocabulary maps both to `<unk>`), can never give a verdict, or only a one-sided one (always 0 or
always 1): noise, not a confidence. `verdict_tokens` finds the vocabulary's yes and no tokens and
`require_verdict_tokens` refuses such a tokenizer (`NoVerdictTokensError`), so the fit says so
instead of fitting a map on noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from calibserve.calibration.confidence import normalize_token
from calibserve.calibration.errors import CalibrationError
from calibserve.calibration.logprobs import clean_logprob

__all__ = [
    "NoVerdictError",
    "NoVerdictTokensError",
    "VerdictTokens",
    "require_verdict_tokens",
    "verdict_tokens",
    "VERIFY_QUESTION",
    "VERIFY_SUFFIX",
    "verify_messages",
    "verify_prompt",
    "verify_confidence",
]

VERIFY_QUESTION = "Is the answer above correct? Reply with yes or no."
VERIFY_SUFFIX = "\nIs the answer above correct? Reply with yes or no.\nAnswer:"
YES = ("yes", "true")
NO = ("no", "false")


class NoVerdictError(CalibrationError):
    """Neither a yes nor a no token is among the verdict's top logprobs."""


class NoVerdictTokensError(CalibrationError):
    """The tokenizer has no token that reads as yes, or none that reads as no."""


def verdict_word(token: str) -> Literal["yes", "no"] | None:
    """"yes" / "no" when `token` (as the engine prints it, or as a vocabulary entry with its
    "Ġ"/"▁" prefix) is one of verify's verdict spellings, else None."""
    word = normalize_token(token).lower()
    if word in YES:
        return "yes"
    if word in NO:
        return "no"
    return None


@dataclass(frozen=True, slots=True)
class VerdictTokens:
    """A vocabulary's tokens that verify reads as yes and as no."""

    yes: tuple[str, ...]
    no: tuple[str, ...]

    @property
    def usable(self) -> bool:
        """Can a verdict be two-sided (at least one yes and one no token)?"""
        return bool(self.yes) and bool(self.no)


def verdict_tokens(tokens: Iterable[str]) -> VerdictTokens:
    """The yes and no tokens among `tokens` (a tokenizer's vocabulary, each token's text)."""
    yes: list[str] = []
    no: list[str] = []
    for token in tokens:
        word = verdict_word(token)
        if word == "yes":
            yes.append(token)
        elif word == "no":
            no.append(token)
    return VerdictTokens(tuple(sorted(yes)), tuple(sorted(no)))


def require_verdict_tokens(tokens: Iterable[str]) -> VerdictTokens:
    """`verdict_tokens`, or `NoVerdictTokensError` saying which side the vocabulary lacks."""
    found = verdict_tokens(tokens)
    if not found.usable:
        missing = " and ".join(side for side, got in (("yes", found.yes), ("no", found.no))
                               if not got)
        raise NoVerdictTokensError(
            f"the tokenizer has no single token for {missing} ({'/'.join(YES + NO)} in any "
            "case or spacing): verify's P(yes) cannot be read from its verdict"
        )
    return found


def verify_messages(
    messages: Sequence[Mapping[str, Any]], reply: str, question: str = VERIFY_QUESTION
) -> list[dict[str, Any]]:
    """The chat conversation that asks whether `reply` answered `messages` correctly."""
    return [
        *(dict(m) for m in messages),
        {"role": "assistant", "content": reply},
        {"role": "user", "content": question},
    ]


def verify_prompt(prompt: str, reply: str, suffix: str = VERIFY_SUFFIX) -> str:
    """The completions prompt that asks whether `reply` continued `prompt` correctly."""
    return f"{prompt}{reply}{suffix}"


def verify_confidence(top: Mapping[str, float | None]) -> float:
    """P(yes) / (P(yes) + P(no)) over the verdict token's alternatives (token -> logprob)."""
    yes: list[float] = []
    no: list[float] = []
    for token, logprob in top.items():
        if logprob is None:
            continue
        value = clean_logprob(logprob)
        if not value > -math.inf:
            continue
        word = verdict_word(token)
        if word == "yes":
            yes.append(value)
        elif word == "no":
            no.append(value)
    if not yes and not no:
        raise NoVerdictError("neither yes nor no is among the verdict's top logprobs")
    log_yes = float(np.logaddexp.reduce(yes)) if yes else -math.inf
    log_no = float(np.logaddexp.reduce(no)) if no else -math.inf
    peak = max(log_yes, log_no)
    p_yes, p_no = math.exp(log_yes - peak), math.exp(log_no - peak)
    return p_yes / (p_yes + p_no)

"""The confidence-method registry: every method the calibration document may name, by name.

Each `ConfidenceMethod` says what it reads and what it costs, so the Scorer (which map to apply),
the document (which names and parameters are valid) and routing (what extra upstream work a reply
needs, and which logprobs to ask for) read one table:

- token statistics (`mean`, `min`, `first`, `quantile`) read the reply's own token logprobs;
- `answer` reads the first token's alternatives (`top_logprobs` >= the number of options) and
  scores only option-letter replies to a prompt that offers options (`mc_prompt.offers_options`);
- `no_letter` scores the other replies to such a prompt (a word, not a letter: "The answer
  is ..."): the reply's geometric-mean token probability, like `mean`, but its own method with its
  own map, fitted on replies of that kind (`calibserve calibrate` sends the multiple-choice items
  through the serving path for it), so that neither the option-letter map nor a free-form map
  fitted on short answers is ever applied to them;
- `verify` (P(True)) needs one extra prompt-only request to the same engine (`max_tokens` 1, the
  verdict token's top 20 logprobs); `consistency` one extra request with `n=k` samples. Both fall
  back to `INTERIM` (the `mean` token statistic, with its own map) when the extra work fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from calibserve.calibration.errors import CalibrationError

__all__ = [
    "CONFIDENCE_METHODS",
    "EXTRA_WORK_METHODS",
    "INTERIM",
    "NO_LETTER",
    "FREE_FORM_METHODS",
    "REGISTRY",
    "TOKEN_METHODS",
    "ConfidenceMethod",
    "ExtraWork",
    "confidence_method",
]

ExtraWork = Literal["none", "verify", "sample"]


@dataclass(frozen=True, slots=True)
class ConfidenceMethod:
    """One confidence method: what it reads, what it costs, which replies it can score."""

    name: str
    extra: ExtraWork = "none"  # none: the reply's own logprobs; verify / sample: one request
    top_logprobs: int = 0  # alternatives per token it needs from the main request
    option_letters: bool = False  # scores only replies whose first token is an option letter
    # scores only replies to an option prompt whose first token is not an option letter
    letterless: bool = False
    summary: str = ""

    @property
    def needs_upstream(self) -> bool:
        """Does scoring a reply cost an extra upstream request?"""
        return self.extra != "none"

    @property
    def free_form(self) -> bool:
        """Can it score any reply to a prompt without options (the document's `free_form`)?"""
        return not (self.option_letters or self.letterless)


REGISTRY: dict[str, ConfidenceMethod] = {
    m.name: m
    for m in (
        ConfidenceMethod("mean", summary="geometric-mean token probability"),
        ConfidenceMethod("min", summary="least likely token"),
        ConfidenceMethod("first", summary="first token's probability"),
        ConfidenceMethod("quantile", summary="q-quantile of token probabilities"),
        ConfidenceMethod("answer", top_logprobs=5, option_letters=True,
                         summary="chosen option's probability among the option letters"),
        ConfidenceMethod("no_letter", letterless=True,
                         summary="geometric-mean token probability of a reply to an option "
                                 "prompt that names no option letter"),
        ConfidenceMethod("verify", extra="verify",
                         summary="P(yes) of a prompt-only 'is this answer correct?' request"),
        ConfidenceMethod("consistency", extra="sample",
                         summary="agreement of k extra samples (one request with n=k)"),
    )
}
CONFIDENCE_METHODS: tuple[str, ...] = tuple(REGISTRY)
TOKEN_METHODS: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if not m.needs_upstream)
EXTRA_WORK_METHODS: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.needs_upstream)
FREE_FORM_METHODS: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.free_form)
# What a method that needs extra work is served as until that work is done, and when it fails (no
# verdict, an upstream error, an unsupported request shape): a token statistic of the reply
# itself, with its own map. (Not the scorer's free-form method, `Scorer.free_form_method`.)
INTERIM = "mean"
# What a reply to an option prompt is scored by when its first token is not an option letter.
NO_LETTER = "no_letter"
DEFAULT_CONSISTENCY_K = 5


def confidence_method(name: str) -> ConfidenceMethod:
    """The registry entry of `name`; a `CalibrationError` naming the valid ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise CalibrationError(
            f"unknown method {name!r}; valid: {', '.join(CONFIDENCE_METHODS)}"
        ) from None

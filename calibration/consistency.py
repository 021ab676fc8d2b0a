"""`consistency` confidence: how many of k extra sampled answers agree with the served one.

The server asks the same engine for k more samples of the same request (one request with `n=k`,
so the prompt is prefilled once) and scores the returned answer by the fraction of samples that
say the same thing after `normalize_answer`, the normalisation the default grader uses. It costs
k extra generations per request, hence opt-in. Multiple-choice replies compare option letters.
"""

from __future__ import annotations

from collections.abc import Sequence

from calibserve.calibration.answers import normalize_answer
from calibserve.calibration.errors import DegenerateDataError

__all__ = ["consistency_confidence"]


def consistency_confidence(answer: str, samples: Sequence[str]) -> float:
    """Fraction of `samples` whose normalised text equals the normalised `answer`."""
    if not samples:
        raise DegenerateDataError("consistency needs at least one sampled answer")
    target = normalize_answer(answer)
    return sum(normalize_answer(s) == target for s in samples) / len(samples)

"""Attach each choice's confidence to an upstream response, and pick the one routing judges.

`score_answer` is the one scoring step of the non-streaming path: every choice scored by the
answering tier's scorer, then (for a free-form method that needs it) refined by the extra
upstream work of confidence_work.py, before anything is judged or returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from calibserve.calibration import CalibrationError, parse_logprobs
from calibserve.calibration.confidence import confidence_json
from calibserve.routing.agreement import choice_text
from calibserve.routing.confidence_work import ConfidenceWork
from calibserve.routing.route import ConfidenceLike
from calibserve.routing.verify_tokens import reply_ids


def reply_tokens(choice: dict[str, Any]) -> list[str]:
    """The choice's tokens as its logprobs spell them (empty when it has none); their
    alternatives are not parsed (5 per token would be most of the work)."""
    try:
        return parse_logprobs(choice.get("logprobs"), 0).tokens
    except (CalibrationError, LookupError, TypeError, ValueError):
        return []


async def score_answer(body: dict[str, Any], work: ConfidenceWork) -> list[ConfidenceLike]:
    """Score every choice of `body` (the tier's JSON answer), do the method's extra work, set
    `choice["confidence"]`; the confidences by position."""
    choices = body.get("choices") or []
    scorer = work.tier.confidence_scorer
    offered = work.options_offered
    first = [(scorer.score_choice(c.get("logprobs"), offered), choice_text(c), reply_tokens(c))
             for c in choices]
    ids = [reply_ids(work.endpoint, body, c) for c in choices]
    confs = await work.refine_all(first, ids)
    for choice, conf in zip(choices, confs, strict=True):
        choice["confidence"] = confidence_json(conf)
    return confs


def decision_score(scores: list[float]) -> float | None:
    """The request's confidence for routing: the least confident choice.

    Escalation is a whole-request decision, and a request is only as trustworthy as the worst
    answer it returns; with n=1 (the usual case) this is simply that choice's confidence.
    """
    return min(scores) if scores else None


def least_confident(confs: Sequence[ConfidenceLike]) -> ConfidenceLike | None:
    """The choice `decision_score` judges (its method and label decide the threshold)."""
    return min(confs, key=lambda c: float(c.score)) if confs else None

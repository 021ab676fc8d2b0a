"""Attach each choice's calibrated confidence to an upstream response."""

from __future__ import annotations

from typing import Any

from calibserve.routing.route import ConfidenceLike, Scorer


def confidence_dict(conf: ConfidenceLike) -> dict[str, Any]:
    """A choice's `confidence`; `calibrated` is False for a scorer that does not say."""
    return {"score": float(conf.score), "raw": float(conf.raw), "method": str(conf.method),
            "calibrated": bool(getattr(conf, "calibrated", False))}


def attach_confidences(body: dict[str, Any], scorer: Scorer) -> list[float]:
    """Set `choice["confidence"]` on every choice; return the calibrated scores by position."""
    scores: list[float] = []
    for choice in body.get("choices") or []:
        conf = scorer.score_choice(choice.get("logprobs"))
        choice["confidence"] = confidence_dict(conf)
        scores.append(float(conf.score))
    return scores


def decision_score(scores: list[float]) -> float | None:
    """The request's confidence for routing: the least confident choice.

    Escalation is a whole-request decision, and a request is only as trustworthy as the worst
    answer it returns; with n=1 (the usual case) this is simply that choice's confidence.
    """
    return min(scores) if scores else None

"""Risk-coverage analysis: which answers to keep (serve) and which to escalate, by confidence.

An answer is kept when `confidence >= threshold`. Curves are evaluated at each distinct
confidence, in descending order, so tied confidences are always kept or escalated together.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from calibserve.calibration._inputs import FloatArray, as_confidences, as_pair
from calibserve.calibration.errors import CalibrationError, DegenerateDataError

__all__ = [
    "DEFAULT_TARGET_ACCURACIES",
    "RiskCoverage",
    "risk_coverage",
    "aurc",
    "auroc",
    "threshold_for_accuracy",
    "threshold_for_rate",
]


# The accuracy targets merge and `calibserve calibrate` store thresholds for when none are given.
DEFAULT_TARGET_ACCURACIES: tuple[float, ...] = (0.7, 0.8, 0.9)


class RiskCoverage(NamedTuple):
    """Per distinct threshold (descending): fraction kept and accuracy of the kept answers."""

    thresholds: FloatArray
    coverage: FloatArray
    accuracy: FloatArray


def risk_coverage(conf: ArrayLike, correct: ArrayLike) -> RiskCoverage:
    """Coverage and accuracy of `{conf >= t}` for every distinct confidence `t`, descending."""
    c, y = as_pair(conf, correct)
    order = np.argsort(-c, kind="stable")
    cs, ys = c[order], y[order]
    kept_correct = np.cumsum(ys)
    # The last position of each run of equal confidences is where that threshold's set ends.
    last = np.flatnonzero(np.append(cs[1:] != cs[:-1], True))
    kept = (last + 1).astype(np.float64)
    return RiskCoverage(cs[last], kept / c.size, kept_correct[last] / kept)


def aurc(conf: ArrayLike, correct: ArrayLike) -> float:
    """Area under the risk-coverage curve (lower is better).

    The mean over samples of the risk (1 - accuracy) of the answers kept at that sample's own
    confidence as threshold: Geifman et al.'s AURC, made independent of the order of ties.
    """
    c, _ = as_pair(conf, correct)
    rc = risk_coverage(conf, correct)
    sizes = np.diff(np.concatenate(([0.0], rc.coverage))) * c.size
    return float(np.sum(sizes * (1.0 - rc.accuracy)) / c.size)


def auroc(conf: ArrayLike, correct: ArrayLike) -> float:
    """Area under the ROC curve of right vs wrong answers ranked by confidence (ties count
    half); NaN when every answer is right or every answer is wrong."""
    c, y = as_pair(conf, correct)
    pos, neg = c[y > 0.5], c[y <= 0.5]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    # Mann-Whitney U from midranks.
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    allc = np.concatenate([pos, neg])[order]
    ranks = np.empty(allc.size)
    i = 0
    while i < allc.size:
        j = i
        while j + 1 < allc.size and allc[j + 1] == allc[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2.0 + 1.0
        i = j + 1
    r = np.empty(allc.size)
    r[order] = ranks
    u = r[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def threshold_for_accuracy(
    conf: ArrayLike, correct: ArrayLike, target: float
) -> dict[str, float | None]:
    """Lowest threshold whose kept answers reach `target` accuracy (i.e. the most coverage).

    Returns `{"threshold", "coverage", "accuracy"}`. When no threshold reaches the target, the
    threshold is `math.inf` (keep nothing: escalate everything), coverage 0.0, accuracy None.
    """
    if not 0.0 <= target <= 1.0:
        raise CalibrationError(f"target accuracy must be in [0, 1], got {target!r}")
    rc = risk_coverage(conf, correct)
    # Tiny tolerance: 0.8 computed as 4/5 must meet a target of 0.8.
    ok = np.flatnonzero(rc.accuracy >= target - 1e-12)
    if ok.size == 0:
        return {"threshold": math.inf, "coverage": 0.0, "accuracy": None}
    i = int(ok[-1])
    return {
        "threshold": float(rc.thresholds[i]),
        "coverage": float(rc.coverage[i]),
        "accuracy": float(rc.accuracy[i]),
    }


def threshold_for_rate(conf: ArrayLike, rate: float) -> float:
    """Threshold below which about `rate` of the samples fall (the escalation rate).

    The `round(rate * n)`-th smallest confidence: with distinct confidences exactly that many are
    below it; ties can only make fewer fall below. `rate = 0` gives 0.0 (nothing escalated),
    `rate = 1` gives `math.inf` (everything escalated).
    """
    if not 0.0 <= rate <= 1.0:
        raise CalibrationError(f"rate must be in [0, 1], got {rate!r}")
    c = np.sort(as_confidences(conf))
    if c.size == 0:
        raise DegenerateDataError("no samples: cannot choose a threshold")
    k = int(round(rate * c.size))
    if k <= 0:
        return 0.0
    if k >= c.size:
        return math.inf
    return float(c[k])

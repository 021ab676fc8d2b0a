"""Offline sweep of the escalation rate from one pass over the data.

For each item we know the primary's answer and confidence, the expert's answer and the gold
answer. Escalating the k least confident items is exactly what a threshold between the k-th and
(k+1)-th confidence does, so every rate 0..100% is evaluated from that single pass instead of
re-running the route per rate. Ties in confidence are broken at random, in expectation (exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Pass:
    """One pass over the items with one primary: correctness of both tiers, primary confidence."""

    confidence: np.ndarray  # primary's confidence (calibrated or raw)
    primary_correct: np.ndarray  # bool
    expert_correct: np.ndarray  # bool

    @classmethod
    def of(cls, conf: Sequence[float], primary: Sequence[bool], expert: Sequence[bool]) -> Pass:
        c = np.asarray(conf, dtype=float)
        p = np.asarray(primary, dtype=bool)
        e = np.asarray(expert, dtype=bool)
        if not (c.shape == p.shape == e.shape) or c.ndim != 1:
            raise ValueError("confidence, primary and expert must be 1-D and the same length")
        return cls(c, p, e)

    @property
    def n(self) -> int:
        return int(self.confidence.size)


def accuracy_by_confidence(run: Pass, k: int) -> float:
    """Final accuracy when the k least confident items go to the expert (ties: expected)."""
    n = run.n
    k = max(0, min(n, k))
    gain = run.expert_correct.astype(float) - run.primary_correct.astype(float)
    total = float(run.primary_correct.sum())
    remaining = k
    for value in np.unique(run.confidence):  # ascending
        if remaining <= 0:
            break
        group = run.confidence == value
        size = int(group.sum())
        take = min(size, remaining)
        total += gain[group].mean() * take  # expected gain of a random `take` of the tie group
        remaining -= take
    return total / n


def accuracy_random(run: Pass, k: int) -> float:
    """Expected final accuracy when k items chosen uniformly at random go to the expert."""
    r = max(0, min(run.n, k)) / run.n
    return float((1 - r) * run.primary_correct.mean() + r * run.expert_correct.mean())


def accuracy_oracle(run: Pass, k: int) -> float:
    """Upper bound: escalate exactly the items where the expert fixes the primary first."""
    gain = np.sort(run.expert_correct.astype(float) - run.primary_correct.astype(float))[::-1]
    k = max(0, min(run.n, k))
    return float((run.primary_correct.sum() + np.clip(gain[:k], 0, None).sum()) / run.n)


def curve(run: Pass, rates: Sequence[float], how: str = "confidence") -> list[float]:
    fn = {"confidence": accuracy_by_confidence, "random": accuracy_random,
          "oracle": accuracy_oracle}[how]
    return [fn(run, round(r * run.n)) for r in rates]


def threshold_for_rate(conf: Sequence[float], rate: float) -> float:
    """A threshold escalating (`confidence < t`) about `rate` of these confidences."""
    c = np.sort(np.asarray(conf, dtype=float))
    k = round(rate * c.size)
    if k <= 0:
        return 0.0
    if k >= c.size:
        return 1.0 + 1e-9
    return float((c[k - 1] + c[k]) / 2) if c[k] > c[k - 1] else float(c[k])

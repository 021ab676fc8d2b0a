"""Pareto frontier over (accuracy, ECE) points and the rules that pick one point from it.

A point dominates another when its accuracy is >= and its ECE is <=, with at least one strict.
Exact duplicates do not dominate each other, so every copy of a non-dominated point is on the
frontier (they are equally good; a sweep that produces two identical points should show both).
Selection rules break remaining ties by the lowest index (the earliest point of the sweep).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from calibserve.calibration.errors import CalibrationError

__all__ = ["RULES", "pareto_frontier", "select_point"]

RULES: tuple[str, ...] = ("max-accuracy", "min-ece", "knee", "min-ece-at-accuracy")


def _as_points(points: Sequence[Sequence[float]]) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise CalibrationError("points must be a sequence of (accuracy, ece) pairs")
    if np.isnan(arr).any():
        raise CalibrationError("points contain NaN")
    return arr


def pareto_frontier(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices (ascending) of the non-dominated points; maximise accuracy, minimise ECE."""
    arr = _as_points(points)
    # Sort by accuracy descending, then ECE ascending; sweep keeping the best ECE seen among
    # strictly more accurate points. O(n log n).
    order = sorted(range(len(arr)), key=lambda i: (-arr[i, 0], arr[i, 1]))
    frontier: list[int] = []
    best_ece = math.inf
    k = 0
    while k < len(order):
        acc = arr[order[k], 0]
        group = [order[k]]
        k += 1
        while k < len(order) and arr[order[k], 0] == acc:
            group.append(order[k])
            k += 1
        lowest = arr[group[0], 1]
        if lowest < best_ece:
            frontier.extend(i for i in group if arr[i, 1] == lowest)
            best_ece = lowest
    return sorted(frontier)


def _knee(arr: np.ndarray, front: list[int]) -> int:
    """Frontier point farthest from the line joining its extremes, axes scaled to [0, 1]."""
    acc = arr[front, 0]
    err = arr[front, 1]
    span_acc = acc.max() - acc.min()
    span_err = err.max() - err.min()
    if span_acc == 0 or span_err == 0:
        # One distinct point (possibly duplicated): no knee; take the most accurate.
        return _best(front, key=lambda i: (-arr[i, 0], arr[i, 1]))
    a = (acc - acc.min()) / span_acc
    e = (err - err.min()) / span_err
    # Extremes: the most accurate point (a=1, highest ECE on the frontier) and the least
    # calibrated-error one (e=0, a=0). On a Pareto frontier these are (1, 1) and (0, 0).
    dist = np.abs(a - e) / math.sqrt(2.0)
    top = dist.max()
    candidates = [i for i, d in zip(front, dist, strict=True) if d == top]
    return _best(candidates, key=lambda i: (-arr[i, 0], arr[i, 1]))


def _best(idx: Iterable[int], key: Callable[[int], tuple[float, float]]) -> int:
    """The index minimising `key`, remaining ties to the lowest index."""
    return min(idx, key=lambda i: (*key(i), i))


def select_point(
    points: Sequence[Sequence[float]], rule: str = "max-accuracy", tolerance: float = 0.01
) -> int:
    """Index of the chosen point.

    - `max-accuracy`: highest accuracy, ties to lower ECE;
    - `min-ece`: lowest ECE, ties to higher accuracy;
    - `knee`: on the frontier (normalised to [0, 1] on both axes), the point farthest from the
      straight line joining the most accurate and the best-calibrated frontier points; ties and
      a degenerate frontier go to the most accurate;
    - `min-ece-at-accuracy`: lowest ECE among points with accuracy >= best - `tolerance`, ties to
      higher accuracy.
    Remaining ties go to the lowest index. Unknown rule: `CalibrationError` (a ValueError).
    """
    if rule not in RULES:
        raise CalibrationError(f"unknown selection rule {rule!r}; valid rules: {', '.join(RULES)}")
    if tolerance < 0 or math.isnan(tolerance):
        raise CalibrationError(f"tolerance must be >= 0, got {tolerance!r}")
    arr = _as_points(points)
    if len(arr) == 0:
        raise CalibrationError("no points to select from")
    every = range(len(arr))
    if rule == "max-accuracy":
        return _best(every, key=lambda i: (-arr[i, 0], arr[i, 1]))
    if rule == "min-ece":
        return _best(every, key=lambda i: (arr[i, 1], -arr[i, 0]))
    if rule == "min-ece-at-accuracy":
        floor = arr[:, 0].max() - tolerance
        near = [i for i in every if arr[i, 0] >= floor]
        return _best(near, key=lambda i: (arr[i, 1], -arr[i, 0]))
    return _knee(arr, pareto_frontier(points))

"""The lambda sweep: evaluate each point once, caching results so a killed run resumes.

Each finished point is written to its own JSON file (`calibserve.publish.write_atomic`: a temp
name, then renamed, so a kill never leaves half a file). The cache directory is keyed by a
fingerprint of everything that determines the numbers (parents, data, method, dtype, batch size,
code version): change any of them and old points are simply not found.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibserve.merge.evaluate import Scores
from calibserve.merge.freeform import FreeFormScores
from calibserve.publish import write_atomic

__all__ = ["Evaluation", "Point", "ResultCache", "fingerprint", "run_sweep", "refine_lambdas"]

# Bump when evaluation code changes the numbers a given input produces.
# 3: short-answer items are generated and scored at every point (`Point.free_form`).
EVAL_VERSION = "3"


@dataclass
class Evaluation:
    """What evaluating one lambda on one split gives: the multiple-choice metrics and scores,
    diversity when measured, and the short-answer metrics and scores when the split has any."""

    metrics: dict[str, float]
    scores: Scores
    diversity: dict[str, float] | None = None
    free_form_metrics: dict[str, float] | None = None
    free_form: FreeFormScores | None = None


@dataclass
class Point:
    """One evaluated lambda on one split."""

    lam: float
    metrics: dict[str, float]
    scores: Scores
    diversity: dict[str, float] | None = None
    seconds: float = 0.0
    cached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # The short-answer items of the split (None: it has none, or they were not scored).
    free_form_metrics: dict[str, float] | None = None
    free_form: FreeFormScores | None = None

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])

    @property
    def ece(self) -> float:
        return float(self.metrics["ece"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "lambda": self.lam,
            "metrics": self.metrics,
            "diversity": self.diversity,
            "seconds": self.seconds,
            "scores": self.scores.to_dict(),
            "free_form": None if self.free_form is None else {
                "metrics": self.free_form_metrics,
                "scores": self.free_form.to_dict(),
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Point:
        ff = d.get("free_form")
        return cls(
            lam=float(d["lambda"]),
            metrics=dict(d["metrics"]),
            scores=Scores.from_dict(d["scores"]),
            diversity=d.get("diversity"),
            seconds=float(d.get("seconds", 0.0)),
            cached=True,
            free_form_metrics=None if ff is None else dict(ff["metrics"]),
            free_form=None if ff is None else FreeFormScores.from_dict(ff["scores"]),
        )


def fingerprint(parts: Mapping[str, Any]) -> str:
    """A short stable hash of JSON-able settings."""
    blob = json.dumps({"eval_version": EVAL_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_identity(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """Cheap identity of input files (name, size, mtime): hashing gigabytes would cost minutes."""
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(paths)]


def data_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class ResultCache:
    """Per-point JSON files under `root/<fingerprint>/`."""

    def __init__(self, root: Path, key: str) -> None:
        self.dir = root / key

    def _path(self, split: str, lam: float) -> Path:
        return self.dir / f"{split}-lambda{lam:+.6f}.json"

    def get(self, split: str, lam: float) -> Point | None:
        path = self._path(split, lam)
        try:
            return Point.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError):
            return None  # absent or unreadable: evaluate again

    def put(self, split: str, point: Point) -> None:
        write_atomic(self._path(split, point.lam), json.dumps(point.to_dict()))


def run_sweep(
    lambdas: Sequence[float],
    evaluate: Callable[[float], Evaluation],
    cache: ResultCache,
    split: str = "select",
    on_point: Callable[[Point], None] | None = None,
) -> list[Point]:
    """Evaluate every lambda not already cached; returns points sorted by lambda."""
    points: list[Point] = []
    for lam in lambdas:
        point = cache.get(split, lam)
        if point is None:
            t0 = time.perf_counter()
            e = evaluate(lam)
            point = Point(lam, e.metrics, e.scores, e.diversity, time.perf_counter() - t0,
                          free_form_metrics=e.free_form_metrics, free_form=e.free_form)
            cache.put(split, point)
        points.append(point)
        if on_point is not None:
            on_point(point)
    return sorted(points, key=lambda p: p.lam)


def refine_lambdas(
    lambdas: Sequence[float], frontier: Iterable[float], min_gap: float = 0.02, limit: int = 6
) -> list[float]:
    """Midpoints between each frontier lambda and its neighbours in the sweep, not yet swept.

    The frontier is where the choice is made, so extra resolution there is worth more than a
    finer grid everywhere.
    """
    grid = sorted(set(lambdas))
    new: list[float] = []
    for lam in sorted(set(frontier)):
        if lam not in grid:
            continue
        k = grid.index(lam)
        for j in (k - 1, k + 1):
            if 0 <= j < len(grid) and abs(grid[j] - lam) >= 2 * min_gap:
                mid = round((grid[j] + lam) / 2, 6) + 0.0
                if mid not in grid and mid not in new:
                    new.append(mid)
    return sorted(new)[:limit] if len(new) <= limit else _closest(new, frontier, limit)


def _closest(candidates: list[float], frontier: Iterable[float], limit: int) -> list[float]:
    f = list(frontier)
    ranked = sorted(candidates, key=lambda c: min(abs(c - x) for x in f))
    return sorted(ranked[:limit])

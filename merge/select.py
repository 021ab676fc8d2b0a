"""Pick the served lambda: the Pareto frontier and a selection rule, both from calibration/.

The report must say why a point won, so `choose` returns the reason in words along with the
index, judged against both parents (lambda 0 and 1) when they were swept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from calibserve.calibration import pareto_frontier, select_point
from calibserve.merge.sweep import Point

__all__ = ["Selection", "choose"]


@dataclass(frozen=True, slots=True)
class Selection:
    index: int
    lam: float
    rule: str
    tolerance: float
    frontier: list[int]
    reason: str
    beats_both_parents_on_accuracy: bool | None

    @property
    def on_frontier(self) -> bool:
        return self.index in self.frontier


def _parent(points: Sequence[Point], lam: float) -> Point | None:
    return next((p for p in points if p.lam == lam), None)


def choose(
    points: Sequence[Point], rule: str = "max-accuracy", tolerance: float = 0.01
) -> Selection:
    """Frontier over (accuracy, ECE) and the point `rule` selects, with the reason."""
    pairs = [(p.accuracy, p.ece) for p in points]
    frontier = pareto_frontier(pairs)
    idx = select_point(pairs, rule=rule, tolerance=tolerance)
    chosen = points[idx]
    why = {
        "max-accuracy": "the highest accuracy on the select split (ties go to the lower ECE)",
        "min-ece": "the lowest ECE on the select split (ties go to the higher accuracy)",
        "knee": "the knee of the frontier: the point farthest from the line joining its most "
        "accurate and its best-calibrated ends",
        "min-ece-at-accuracy": f"the lowest ECE among points within {tolerance:g} of the best "
        "accuracy",
    }.get(rule, rule)
    parts = [
        f"lambda={chosen.lam:g} has {why}: accuracy {chosen.accuracy:.3f}, ECE {chosen.ece:.3f} "
        f"({len(frontier)} of {len(points)} points are on the frontier)."
    ]
    base, aligned = _parent(points, 0.0), _parent(points, 1.0)
    beats: bool | None = None
    if base is not None and aligned is not None:
        beats = chosen.accuracy > base.accuracy and chosen.accuracy > aligned.accuracy
        parts.append(
            f"Parents: base accuracy {base.accuracy:.3f} / ECE {base.ece:.3f}, aligned accuracy "
            f"{aligned.accuracy:.3f} / ECE {aligned.ece:.3f}."
        )
        if aligned.ece > 0:
            parts.append(f"Its ECE is {chosen.ece / aligned.ece:.2f}x the aligned model's.")
        parts.append(
            "It is more accurate than both parents."
            if beats
            else "It is not more accurate than both parents."
        )
    return Selection(idx, chosen.lam, rule, tolerance, frontier, " ".join(parts), beats)

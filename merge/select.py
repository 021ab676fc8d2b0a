"""Pick the served lambda: the Pareto frontier and a selection rule, both from calibration/.

A rule is applied to one objective's (accuracy, ECE) pairs (`--select OBJECTIVE:RULE`):
- `multiple-choice` (the default): the option-letter confidence on the multiple-choice items;
- `free-form`: the raw free-form (`mean`) confidence on the short answers, graded;
- `combined`: the mean of the two (each kind of item weighted one half).

The report must say why a point won, so `choose` returns the reason in words along with the
index, judged against both parents (lambda 0 and 1) when they were swept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from calibserve.calibration import pareto_frontier, select_point
from calibserve.merge.sweep import Point

__all__ = ["OBJECTIVE_NAMES", "Selection", "available_objectives", "choose", "objective_pair"]

# How the report and the reason name each objective's numbers.
OBJECTIVE_NAMES: dict[str, str] = {
    "multiple-choice": "multiple-choice",
    "free-form": "free-form (short answers)",
    "combined": "combined (mean of multiple-choice and free-form)",
}


@dataclass(frozen=True, slots=True)
class Selection:
    index: int
    lam: float
    rule: str
    tolerance: float
    frontier: list[int]
    reason: str
    beats_both_parents_on_accuracy: bool | None
    objective: str = "multiple-choice"

    @property
    def on_frontier(self) -> bool:
        return self.index in self.frontier


def objective_pair(p: Point, objective: str) -> tuple[float, float]:
    """(accuracy, ECE) of `p` under `objective` (ValueError: the point has no short answers)."""
    if objective == "multiple-choice":
        return p.accuracy, p.ece
    ff = p.free_form_metrics
    if ff is None:
        raise ValueError(f"lambda={p.lam:g} has no short-answer metrics for {objective!r}")
    if objective == "free-form":
        return float(ff["accuracy"]), float(ff["ece"])
    if objective == "combined":
        return (p.accuracy + float(ff["accuracy"])) / 2, (p.ece + float(ff["ece"])) / 2
    raise ValueError(f"unknown objective {objective!r}")


def available_objectives(points: Sequence[Point]) -> list[str]:
    """The objectives every point can be judged by."""
    if points and all(p.free_form_metrics is not None for p in points):
        return list(OBJECTIVE_NAMES)
    return ["multiple-choice"]


def _parent(points: Sequence[Point], lam: float) -> int | None:
    return next((i for i, p in enumerate(points) if p.lam == lam), None)


def choose(
    points: Sequence[Point],
    rule: str = "max-accuracy",
    tolerance: float = 0.01,
    objective: str = "multiple-choice",
) -> Selection:
    """Frontier over `objective`'s (accuracy, ECE) and the point `rule` selects, with the
    reason."""
    pairs = [objective_pair(p, objective) for p in points]
    frontier = pareto_frontier(pairs)
    idx = select_point(pairs, rule=rule, tolerance=tolerance)
    chosen = points[idx]
    kind = OBJECTIVE_NAMES[objective]
    why = {
        "max-accuracy": "the highest accuracy on the select split (ties go to the lower ECE)",
        "min-ece": "the lowest ECE on the select split (ties go to the higher accuracy)",
        "knee": "the knee of the frontier: the point farthest from the line joining its most "
        "accurate and its best-calibrated ends",
        "min-ece-at-accuracy": f"the lowest ECE among points within {tolerance:g} of the best "
        "accuracy",
    }.get(rule, rule)
    acc, err = pairs[idx]
    parts = [
        f"Objective: {kind}. lambda={chosen.lam:g} has {why}: accuracy {acc:.3f}, ECE {err:.3f} "
        f"({len(frontier)} of {len(points)} points are on the frontier)."
    ]
    if objective != "multiple-choice" and chosen.free_form_metrics is not None:
        ff = chosen.free_form_metrics
        parts.append(
            f"Multiple-choice accuracy {chosen.accuracy:.3f} / ECE {chosen.ece:.3f}; free-form "
            f"accuracy {float(ff['accuracy']):.3f} / ECE {float(ff['ece']):.3f}."
        )
    base, aligned = _parent(points, 0.0), _parent(points, 1.0)
    beats: bool | None = None
    if base is not None and aligned is not None:
        (b_acc, b_ece), (a_acc, a_ece) = pairs[base], pairs[aligned]
        beats = acc > b_acc and acc > a_acc
        parts.append(
            f"Parents: base accuracy {b_acc:.3f} / ECE {b_ece:.3f}, aligned accuracy "
            f"{a_acc:.3f} / ECE {a_ece:.3f}."
        )
        if a_ece > 0:
            parts.append(f"Its ECE is {err / a_ece:.2f}x the aligned model's.")
        parts.append(
            "It is more accurate than both parents."
            if beats
            else "It is not more accurate than both parents."
        )
    return Selection(idx, chosen.lam, rule, tolerance, frontier, " ".join(parts), beats,
                     objective)

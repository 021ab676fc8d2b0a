"""One method's fit on its graded replies: the calibrator, thresholds, certificates, metrics.

A method's sample is its (raw, right) pairs: a reply is graded against the gold answer and its
aliases by a `Grader` (`answers.exact_match` by default); an extra-work method (`verify`,
`consistency`) keeps only the replies it served (the others are counted). The calibrator is
`calibration.choose_calibrator`'s family choice (or one forced family), with escalation
thresholds of its own and, for `guarantees`, certified thresholds; the fit records ECE raw and
calibrated, AUROC, accuracy and the families' held-out ECE. Single-class data (every reply
wrong) is fitted by Platt's smoothed constant (`calibration.family`), so an always-wrong kind of
reply is served ~0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibserve.calibration import (
    DegenerateDataError,
    FitMetrics,
    MethodCalibration,
    MethodParams,
    ServedMethod,
    Threshold,
    auroc,
    choose_calibrator,
    confidence_method,
    ece,
)
from calibserve.calibration.answers import Grader
from calibserve.calibration.certified import (
    NO_GUARANTEES,
    GuaranteeTargets,
    certified_thresholds,
)
from calibserve.fit.passes import Reply
from calibserve.fit.raw import method_raw, served_raw
from calibserve.merge.calibrate import thresholds_for

__all__ = [
    "Sample",
    "fit_method",
    "graded",
    "method_report",
    "method_sample",
]


@dataclass(frozen=True)
class Sample:
    """One method's (raw, right) pairs on one split, and the replies it did not serve."""

    raw: np.ndarray
    correct: np.ndarray
    not_served: dict[str, int]  # served-by method -> replies left out (extra-work methods)
    questions: list[str] | None = None  # each pair's question: the calibrator's folds group by it

    def note(self, method: str) -> str | None:
        if not self.not_served:
            return None
        parts = ", ".join(f"{n} by {m}" for m, n in sorted(self.not_served.items()))
        return (f"{method} is fitted on the {self.raw.size} replies it served; not served by it: "
                f"{parts} (answer: an option letter; mean: the fallback when the extra request "
                "gave no verdict or failed)")


def graded(replies: Sequence[Reply], items: Sequence[Mapping[str, Any]], grader: Grader
           ) -> np.ndarray:
    """Each reply right or wrong: `grader(reply, gold answer, aliases)`."""
    return np.asarray([bool(grader(r.text, str(it["answer"]), list(it.get("aliases", []))))
                       for r, it in zip(replies, items, strict=True)], dtype=bool)


def method_sample(items: Sequence[Mapping[str, Any]], replies: Sequence[Reply], method: str,
                  grader: Grader, q: float) -> Sample:
    """`method`'s sample on (items, replies): every reply for a token statistic (its raw
    recomputed, `raw.method_raw`), the replies it served for an extra-work method."""
    correct = graded(replies, items, grader)
    if not confidence_method(method).needs_upstream:
        raw = np.asarray([method_raw(r, method, q) for r in replies], dtype=np.float64)
        return Sample(raw, correct, {}, [str(it["question"]) for it in items])
    values = [served_raw(r, method) for r in replies]
    keep = np.asarray([v is not None for v in values], dtype=bool)
    not_served: dict[str, int] = {}
    for r, v in zip(replies, values, strict=True):
        if v is None:
            by = str(r.confidence.get("method"))
            not_served[by] = not_served.get(by, 0) + 1
    raw = np.asarray([v for v in values if v is not None], dtype=np.float64)
    questions = [str(it["question"]) for it, k in zip(items, keep, strict=True) if k]
    return Sample(raw, correct[keep], not_served, questions)


def fit_method(sample: Sample, kind: str, targets: Sequence[float], params: MethodParams,
               method: str, n_bins: int, seed: int,
               guarantees: GuaranteeTargets = NO_GUARANTEES) -> MethodCalibration:
    """`method`'s entry fitted on `sample` (`kind`: `auto` or one family); no calibrator, and no
    fit unless there is something to say, when the sample is empty."""
    raw, correct = sample.raw, sample.correct
    families = None if kind == "auto" else [kind]
    notes = [n for n in [sample.note(method)] if n]
    try:
        choice = choose_calibrator(raw, correct, families=families, questions=sample.questions,
                                   n_bins=n_bins, seed=seed)
    except DegenerateDataError:  # no replies at all
        fit = None
        if notes:
            fit = FitMetrics(n=0, ece_raw=0.0, ece_calibrated=0.0, notes=notes)
        return MethodCalibration(params=params, fit=fit)
    calibrated = choice.apply(raw)
    fitted = choice.family != "identity"
    thresholds, unreachable = thresholds_for(calibrated, correct, targets) if fitted else ([], [])
    certified, uncertified = (certified_thresholds(calibrated, correct, guarantees) if fitted
                              else ([], []))
    notes += uncertified
    area = auroc(raw, correct)
    fit = FitMetrics(
        n=int(raw.size), ece_raw=ece(raw, correct, n_bins),
        ece_calibrated=ece(calibrated, correct, n_bins), accuracy=float(np.mean(correct)),
        auroc=area if math.isfinite(area) else None,
        unreachable_targets=unreachable or None, calibrator=choice.family,
        held_out_ece=dict(choice.held_out_ece) or None,
        held_out=choice.held_out_dict() or None, selection=choice.selection or None,
        notes=[*choice.notes, *notes] or None, labels="gold",  # graded replies
    )
    return MethodCalibration(
        params=params,
        calibrator=choice.calibrator.to_dict() if fitted else None,
        thresholds=[Threshold.model_validate(t) for t in thresholds],
        guarantees=certified,
        fit=fit,
    )


def method_report(samples: Mapping[str, Sample], entries: Mapping[str, MethodCalibration],
                  n_bins: int) -> dict[str, Any]:
    """Per method, its sample's numbers as served by its entry: `n`, `accuracy`, ECE raw and
    calibrated, `auroc`, `mean_confidence`, `calibrated` (and `not_served`); NaN when empty."""
    out: dict[str, Any] = {}
    for method, sample in samples.items():
        raw, correct = sample.raw, sample.correct
        served = ServedMethod(method, entries[method].calibration_map())
        score = np.asarray([served.score(float(v)) for v in raw])
        out[method] = {
            "n": int(raw.size), "accuracy": float(np.mean(correct)) if raw.size else math.nan,
            "ece_raw": ece(raw, correct, n_bins) if raw.size else math.nan,
            "ece_calibrated": ece(score, correct, n_bins) if raw.size else math.nan,
            "auroc": auroc(raw, correct) if raw.size else math.nan,
            "mean_confidence": float(np.mean(score)) if raw.size else math.nan,
            "calibrated": served.calibrated,
        }
        if sample.not_served:
            out[method]["not_served"] = dict(sample.not_served)
    return out

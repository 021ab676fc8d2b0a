"""The served confidence: fit the calibrator at the chosen lambda, pick escalation thresholds,
and build the calibration document (`calibration.json`, schema in docs/internals.md).

Everything goes through calibration/'s own functions (the raw `answer` confidence, calibrators,
`threshold_for_accuracy`), so the server computes the same numbers from vLLM's logprobs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from calibserve.calibration import (
    N_BINS,
    CalibrationDocument,
    Calibrator,
    DegenerateDataError,
    FitMetrics,
    IdentityCalibrator,
    IsotonicCalibrator,
    MergeInfo,
    MethodCalibration,
    MethodParams,
    PlattScaling,
    TemperatureScaling,
    Threshold,
    ece,
    threshold_for_accuracy,
)
from calibserve.merge.evaluate import Scores

__all__ = ["CALIBRATORS", "Calibration", "fit_calibration", "calibration_json"]

CALIBRATORS: dict[str, type[Calibrator]] = {
    "temperature": TemperatureScaling,
    "platt": PlattScaling,
    "isotonic": IsotonicCalibrator,
}


@dataclass
class Calibration:
    """A fitted calibrator with its thresholds and fit-split metrics."""

    calibrator: Calibrator
    thresholds: list[dict[str, Any]]
    metrics: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def apply(self, conf: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.asarray(self.calibrator.apply(conf), dtype=np.float64)


def fit_calibration(
    scores: Scores, kind: str, targets: Sequence[float], n_bins: int = N_BINS
) -> Calibration:
    """Fit `kind` on (raw confidence, correct); thresholds on the CALIBRATED confidence."""
    notes: list[str] = []
    try:
        calibrator: Calibrator = CALIBRATORS[kind]().fit(scores.confidence, scores.correct)
    except DegenerateDataError as exc:
        # All answers right (or all wrong): nothing to learn; serve the raw confidence.
        calibrator = IdentityCalibrator()
        notes.append(f"calibrator not fitted ({exc}); the identity map is used")
    calibrated = np.asarray(calibrator.apply(scores.confidence), dtype=np.float64)
    thresholds: list[dict[str, Any]] = []
    unreachable: list[float] = []
    for target in targets:
        found = threshold_for_accuracy(calibrated, scores.correct, target)
        thr = float(found["threshold"])  # type: ignore[arg-type]
        if not math.isfinite(thr):
            unreachable.append(target)  # no threshold reaches it; JSON has no infinity
            continue
        thresholds.append(
            {
                "target_accuracy": target,
                "threshold": thr,
                "coverage": found["coverage"],
                "accuracy": found["accuracy"],
            }
        )
    if unreachable:
        notes.append(
            "no confidence threshold reaches target accuracy "
            + ", ".join(f"{t:g}" for t in unreachable)
            + " on the calibrate split: those targets are left out of calibration.json"
        )
    metrics: dict[str, Any] = {
        "ece_raw": ece(scores.confidence, scores.correct, n_bins),
        "ece_calibrated": ece(calibrated, scores.correct, n_bins),
        "n": int(calibrated.size),
        "accuracy": float(np.mean(scores.correct)),
    }
    if unreachable:
        metrics["unreachable_targets"] = unreachable
    return Calibration(calibrator, thresholds, metrics, notes)


def calibration_json(
    cal: Calibration,
    options: Sequence[str],
    merge_block: Mapping[str, Any] | None,
    extra_metrics: Mapping[str, Any],
) -> CalibrationDocument:
    """The `OUT/model/calibration.json` document (`merge_block` None: not a merge).

    The calibrator was fitted on multiple-choice items scored by `answer`, so it is `answer`'s
    alone; free-form replies are scored by `mean`, which has no calibrator of its own (served
    with `calibrated: false`) until one is fitted on short answers.
    """
    fit = FitMetrics(
        n=int(cal.metrics["n"]),
        ece_raw=float(cal.metrics["ece_raw"]),
        ece_calibrated=float(cal.metrics["ece_calibrated"]),
        accuracy=float(cal.metrics["accuracy"]),
        unreachable_targets=cal.metrics.get("unreachable_targets"),
    )
    fitted = not isinstance(cal.calibrator, IdentityCalibrator)  # identity: nothing was learnt
    answer = MethodCalibration(
        params=MethodParams(options=list(options), temperature=1.0),
        calibrator=cal.calibrator.to_dict() if fitted else None,
        thresholds=[Threshold.model_validate(t) for t in cal.thresholds],
        fit=fit,
    )
    return CalibrationDocument(
        methods={"answer": answer, "mean": MethodCalibration()},
        multiple_choice="answer",
        free_form="mean",
        merge=MergeInfo.model_validate(dict(merge_block)) if merge_block is not None else None,
        metrics=dict(extra_metrics),
    )

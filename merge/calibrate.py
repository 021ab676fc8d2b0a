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
    FAMILIES,
    N_BINS,
    CalibrationDocument,
    Calibrator,
    DegenerateDataError,
    FamilyChoice,
    FitMetrics,
    IdentityCalibrator,
    MergeInfo,
    MethodCalibration,
    MethodParams,
    OptionLogits,
    OptionTemperature,
    Threshold,
    choose_calibrator,
    ece,
    threshold_for_accuracy,
)
from calibserve.calibration.certified import NO_GUARANTEES, GuaranteeTargets, certified_thresholds
from calibserve.calibration.document import Guarantee
from calibserve.calibration.label_free import fit_daca
from calibserve.calibration.online import confidence_quantiles
from calibserve.merge.evaluate import Scores

__all__ = ["CALIBRATORS", "LABEL_FREE_NOTE", "Calibration", "fit_calibration", "fit_label_free",
           "calibration_json", "thresholds_for"]

# Said in the document's notes and by the CLI: what a label-free map cannot give.
LABEL_FREE_NOTE = (
    "label-free fit: no escalation thresholds (a threshold that promises an accuracy needs "
    "labelled data to be certified); serve with an explicit --threshold, or refit with labels")

# `--calibrator`: one family, or `auto` (the default) to choose by held-out ECE.
CALIBRATORS: tuple[str, ...] = ("auto", *FAMILIES)


@dataclass
class Calibration:
    """A fitted calibrator with its thresholds and fit-split metrics.

    `temperature` is the `answer` method's multi-class option temperature (1.0 unless the
    `option_temperature` family was chosen); `calibrator` is the scalar map on top of it.
    """

    calibrator: Calibrator
    thresholds: list[dict[str, Any]]
    metrics: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    temperature: float = 1.0
    family: str = "identity"
    guarantees: list[Guarantee] = field(default_factory=list)  # certified thresholds

    def apply(self, conf: NDArray[np.float64], options: OptionLogits | None = None
              ) -> NDArray[np.float64]:
        """Served confidence from the raw (T = 1) one; the option logits when T != 1."""
        raw = conf
        if self.temperature != 1.0:
            if options is None:
                raise ValueError("the option temperature needs the option logits")
            raw = OptionTemperature(self.temperature).confidence(
                options.logits, options.prediction, options.groups)
        return np.asarray(self.calibrator.apply(raw), dtype=np.float64)

    def serve(self, scores: Scores) -> Scores:
        """`scores` with the served (calibrated) confidence."""
        return scores.served(self.apply(scores.confidence, scores.options))


def thresholds_for(
    calibrated: NDArray[np.float64], correct: NDArray[np.bool_], targets: Sequence[float]
) -> tuple[list[dict[str, Any]], list[float]]:
    """Escalation thresholds on the CALIBRATED confidence, and the targets none reaches."""
    thresholds: list[dict[str, Any]] = []
    unreachable: list[float] = []
    for target in targets:
        found = threshold_for_accuracy(calibrated, correct, target)
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
    return thresholds, unreachable


def fit_calibration(
    scores: Scores, kind: str, targets: Sequence[float], n_bins: int = N_BINS, seed: int = 0,
    guarantees: GuaranteeTargets = NO_GUARANTEES,
) -> Calibration:
    """Fit `kind` (a family, or `auto`: chosen by 5-fold held-out log loss,
    `calibration.choose_calibrator`) on (raw confidence,
    correct) and the option logits; thresholds on the CALIBRATED confidence, and the certified
    thresholds of `guarantees` (`calibration.certified`; a target that cannot be certified is a
    `not certified` note)."""
    if kind not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {kind!r}; valid: {', '.join(CALIBRATORS)}")
    options = scores.options
    notes: list[str] = []
    if kind == "option_temperature" and options is None:
        raise ValueError("option_temperature needs the option logits (not in these scores)")
    families = None if kind == "auto" else [kind]
    try:
        choice = choose_calibrator(scores.confidence, scores.correct, options,
                                   families=families, n_bins=n_bins, seed=seed)
    except DegenerateDataError as exc:  # empty or NaN data
        choice = FamilyChoice("identity", IdentityCalibrator(),
                              notes=[f"calibrator not fitted ({exc}); the identity map is used"])
    notes += choice.notes
    if kind == "auto" and options is None:
        notes.append("option logits not recorded: option_temperature was not a candidate")
    cal = Calibration(choice.calibrator, [], {}, notes, choice.temperature, choice.family)
    calibrated = cal.apply(scores.confidence, options)
    cal.thresholds, unreachable = thresholds_for(calibrated, scores.correct, targets)
    cal.guarantees, uncertified = certified_thresholds(calibrated, scores.correct, guarantees)
    notes += uncertified
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
        "calibrator": choice.family,
    }
    if calibrated.size:
        metrics["confidence_quantiles"] = confidence_quantiles(calibrated)
    if choice.held_out:
        metrics["held_out_ece"] = dict(choice.held_out_ece)
        metrics["held_out"] = choice.held_out_dict()
    if choice.selection:
        metrics["selection"] = choice.selection
    if unreachable:
        metrics["unreachable_targets"] = unreachable
    cal.metrics = metrics
    return cal


def fit_label_free(
    model: OptionLogits, reference: OptionLogits, n_bins: int = N_BINS,
    reference_name: str | None = None,
) -> Calibration:
    """The `answer` method's option temperature fitted by DACA (calibration/label_free.py):
    `model`'s option logits tempered towards `reference`'s option distribution on the items
    where both pick the same option. No label is read (`gold` of either is ignored).

    No thresholds (they need labels). The fit metrics record `labels: "none"`, the agreement
    and the items fitted on; `ece_raw` / `ece_calibrated` are measured against the reference's
    probability of the option `model` answered (what DACA takes as its correctness), not
    against answers, and `accuracy` is unknown (None)."""
    if model.logits.shape[0] != reference.logits.shape[0]:
        raise ValueError("the model's and the reference's option logits differ in length")
    notes: list[str] = []
    try:
        fit = fit_daca(model.logits, reference.logits, model.groups,
                       base_groups=reference.groups)
        temperature, n_agree, agreement = fit.temperature, fit.n_agree, fit.agreement
    except DegenerateDataError as exc:
        temperature, n_agree, agreement = 1.0, 0, 0.0
        notes.append(f"option temperature not fitted ({exc}); the raw confidence is served")
    raw = OptionTemperature(1.0).confidence(model.logits, model.prediction, model.groups)
    served = OptionTemperature(temperature).confidence(
        model.logits, model.prediction, model.groups)
    # The reference's probability of the option the model answered: DACA's stand-in for
    # correctness (the reference is taken to be calibrated).
    ref_p = OptionTemperature(1.0).confidence(reference.logits, model.prediction, reference.groups)
    ref_p = np.nan_to_num(ref_p, nan=0.0)
    how = (f"DACA (label-free): softmax(z / T) of the model fitted to the reference's option "
           f"distribution on the {n_agree} of {raw.size} items where both pick the same option "
           f"(agreement {agreement:.3f}); golden-section search on log T")
    notes.append(LABEL_FREE_NOTE)
    metrics: dict[str, Any] = {
        "ece_raw": ece(raw, ref_p, n_bins),
        "ece_calibrated": ece(served, ref_p, n_bins),
        "n": int(raw.size),
        "accuracy": None,
        "calibrator": "option_temperature" if temperature != 1.0 else "identity",
        "selection": how,
        "labels": "none",
        "agreement": float(agreement),
        "n_agree": int(n_agree),
    }
    if reference_name is not None:
        metrics["reference"] = reference_name
    if served.size:
        metrics["confidence_quantiles"] = confidence_quantiles(served)
    return Calibration(IdentityCalibrator(), [], metrics, notes, temperature,
                       "option_temperature" if temperature != 1.0 else "identity")


def calibration_json(
    cal: Calibration,
    options: Sequence[str],
    merge_block: Mapping[str, Any] | None,
    extra_metrics: Mapping[str, Any],
    free_form_methods: Mapping[str, MethodCalibration] | None = None,
    free_form: str = "mean",
) -> CalibrationDocument:
    """The `OUT/model/calibration.json` document (`merge_block` None: not a merge).

    The calibrator was fitted on multiple-choice items scored by `answer`, so it is `answer`'s
    alone (a chosen option temperature is `answer`'s `params.temperature`, the identity on
    top). Free-form replies are scored by `free_form` (default `mean`); `free_form_methods`
    holds the free-form methods' own entries (fitted on short answers: `calibserve.fit`);
    a free-form method without one has no calibrator (served with `calibrated: false`).
    """
    fit = FitMetrics(
        n=int(cal.metrics["n"]),
        ece_raw=float(cal.metrics["ece_raw"]),
        ece_calibrated=float(cal.metrics["ece_calibrated"]),
        accuracy=None if cal.metrics.get("accuracy") is None else float(cal.metrics["accuracy"]),
        unreachable_targets=cal.metrics.get("unreachable_targets"),
        calibrator=cal.metrics.get("calibrator"),
        held_out_ece=cal.metrics.get("held_out_ece"),
        held_out=cal.metrics.get("held_out"),
        selection=cal.metrics.get("selection"),
        notes=list(cal.notes) or None,
        confidence_quantiles=cal.metrics.get("confidence_quantiles"),
        labels=cal.metrics.get("labels", "gold"),
        reference=cal.metrics.get("reference"),
        agreement=cal.metrics.get("agreement"),
        n_agree=cal.metrics.get("n_agree"),
    )
    # The identity learnt nothing, unless it sits on a fitted option temperature (the map then).
    fitted = not isinstance(cal.calibrator, IdentityCalibrator) or cal.temperature != 1.0
    answer = MethodCalibration(
        params=MethodParams(options=list(options), temperature=cal.temperature),
        calibrator=cal.calibrator.to_dict() if fitted else None,
        thresholds=[Threshold.model_validate(t) for t in cal.thresholds],
        guarantees=list(cal.guarantees),
        fit=fit,
    )
    return CalibrationDocument(
        methods={"answer": answer, free_form: MethodCalibration(), **(free_form_methods or {})},
        multiple_choice="answer",
        free_form=free_form,
        merge=MergeInfo.model_validate(dict(merge_block)) if merge_block is not None else None,
        metrics=dict(extra_metrics),
    )

"""`no_letter`: the map for a reply to a multiple-choice prompt that names no option letter.

The multiple-choice items (`mc_cal`, and `mc_test` to report) go through the first serving pass
too, each as its own user message (`format_mc_prompt`); the replies the server scored by
`no_letter` (calibration/methods.py) are graded by `answers.option_letter` against the gold
letter and fitted like the free-form methods (an always-wrong kind of reply gets Platt's
smoothed constant, near 0). Fewer than `MIN_NO_LETTER` such replies: no map (served
`calibrated: false`), with a note.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibserve.calibration import (
    DEFAULT_TARGET_ACCURACIES,
    N_BINS,
    FitMetrics,
    MethodCalibration,
    MethodParams,
    confidence_score,
)
from calibserve.calibration.answers import option_letter
from calibserve.calibration.certified import NO_GUARANTEES, GuaranteeTargets
from calibserve.calibration.mc_prompt import LETTERS
from calibserve.calibration.methods import NO_LETTER
from calibserve.fit.errors import ServeFitError
from calibserve.fit.method_fit import Sample, fit_method, method_report
from calibserve.fit.passes import Reply, Split
from calibserve.fit.raw import RAW_TOLERANCE, served_raw

__all__ = [
    "MIN_NO_LETTER",
    "fit_no_letter",
    "mc_splits",
]

# Below this many letterless replies to the multiple-choice calibrate items, `no_letter` gets no
# map: a map fitted on a handful of replies would be checked on nothing.
MIN_NO_LETTER = 20


def mc_splits(data_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The multiple-choice items of `data_dir`'s calibrate and test splits (either may be
    empty), for `no_letter`."""
    from calibserve.merge.evaluate import load_mc_items

    return (load_mc_items(Path(data_dir) / "calibrate.jsonl"),
            load_mc_items(Path(data_dir) / "test.jsonl"))


def _letterless(items: Sequence[Mapping[str, Any]], replies: Sequence[Reply]) -> Sample:
    """(raw, right) of the replies the server scored by `no_letter`; right: the reply's leading
    letter is the gold one (`answers.option_letter`)."""
    raw: list[float] = []
    right: list[bool] = []
    questions: list[str] = []
    for item, reply in zip(items, replies, strict=True):
        value = served_raw(reply, NO_LETTER)
        if value is None:
            continue
        questions.append(str(item["question"]))
        recomputed = confidence_score(reply.logprobs or {"content": []}, NO_LETTER)
        if abs(value - (recomputed if math.isfinite(recomputed) else 0.0)) > RAW_TOLERANCE:
            raise ServeFitError(f"served raw {NO_LETTER} confidence {value!r} differs from its "
                                f"recomputation {recomputed!r}: the fit would not be what is "
                                "served")
        letters = LETTERS[: len(item["choices"])]
        raw.append(value)
        right.append(option_letter(reply.text, letters) == letters[int(item["answer"])])
    return Sample(np.asarray(raw, dtype=np.float64), np.asarray(right, dtype=bool), {},
                   questions)


def fit_no_letter(
    calibrate: Split,
    test: Split | None = None,
    *,
    kind: str = "auto",
    targets: Sequence[float] = DEFAULT_TARGET_ACCURACIES,
    n_bins: int = N_BINS,
    seed: int = 0,
    guarantees: GuaranteeTargets = NO_GUARANTEES,
) -> tuple[MethodCalibration, dict[str, Any]]:
    """`no_letter`'s entry, fitted on the multiple-choice (items, replies) the server scored by
    it (module docstring), and its report: per split, the items asked, the replies without a
    letter (`n`), their accuracy, ECE raw and calibrated."""
    sample = _letterless(*calibrate)
    report: dict[str, Any] = {"calibrate": {"items": len(calibrate[0])}}
    if sample.raw.size < MIN_NO_LETTER:
        entry = MethodCalibration(params=MethodParams(), fit=FitMetrics(
            n=int(sample.raw.size), ece_raw=0.0, ece_calibrated=0.0,
            notes=[f"{sample.raw.size} of {len(calibrate[0])} multiple-choice replies named no "
                   f"option letter (fewer than {MIN_NO_LETTER}): no map, such replies are "
                   "served calibrated: false"]))
    else:
        entry = fit_method(sample, kind, targets, MethodParams(), NO_LETTER, n_bins, seed,
                           guarantees)
    served = method_report({NO_LETTER: sample}, {NO_LETTER: entry}, n_bins)
    report["calibrate"].update(served[NO_LETTER])
    if test is not None and len(test[0]):
        held = _letterless(*test)
        held_served = method_report({NO_LETTER: held}, {NO_LETTER: entry}, n_bins)
        report["test"] = {"items": len(test[0]), **held_served[NO_LETTER]}
    return entry, report

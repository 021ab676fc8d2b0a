"""The free-form methods fitted on the short answers as served, and the one served for them.

Every method gets its own calibrator on its graded replies (`method_fit`): the token statistics
over every reply of the main pass, also those whose first token is an option letter (a
short-answer question offers no options, so the server serves them with the free-form method
too; their count is recorded, `served_by_answer`, 0 unless a question reads as offering
options); `verify` and `consistency` on the replies they served, in the main pass or a pass of
their own. `free_form` is the fitted method with the highest AUROC (raw confidence, right vs
wrong, on the calibrate split, each method on the replies it served; an undefined AUROC, one
class only, counts as 0.5; ties: the earlier in the list), unless one is forced
(`free_form=`); when no method could be fitted `free_form` stays `mean` with no calibrator,
served `calibrated: false`. A `test` split is reported per method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from calibserve.calibration import (
    DEFAULT_TARGET_ACCURACIES,
    N_BINS,
    MethodCalibration,
    MethodParams,
    auroc,
)
from calibserve.calibration.answers import Grader, exact_match
from calibserve.calibration.certified import NO_GUARANTEES, GuaranteeTargets
from calibserve.fit.method_fit import (
    fit_method,
    graded,
    method_report,
    method_sample,
)
from calibserve.fit.methods import FREE_FORM_FIT_METHODS, TOKEN_FIT_METHODS
from calibserve.fit.passes import Reply, Split

__all__ = [
    "FreeFormFit",
    "fit_free_form",
]


@dataclass
class FreeFormFit:
    """The fitted entries, the chosen `free_form` method and the numbers to report."""

    methods: dict[str, MethodCalibration]
    free_form: str
    report: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    # `no_letter`'s entry and report (`fit_no_letter`), when multiple-choice items were served.
    no_letter: tuple[MethodCalibration, dict[str, Any]] | None = None


def _params(method: str, q: float, given: Mapping[str, MethodParams]) -> MethodParams:
    """A method's parameters: the given ones, else `quantile`'s q (nothing for the others)."""
    if method in given:
        return given[method]
    return MethodParams(quantile=q) if method == "quantile" else MethodParams()


def _present(methods: Sequence[str] | None, calibrate: Split,
             passes: Mapping[str, Sequence[Reply]]) -> tuple[str, ...]:
    """`methods`, or by default every token statistic plus each extra-work method that served
    some reply (in the main replies or a pass of its own)."""
    if methods is not None:
        return tuple(methods)
    served = {str(r.confidence.get("method")) for r in calibrate[1]} | set(passes)
    return (*TOKEN_FIT_METHODS,
            *(m for m in FREE_FORM_FIT_METHODS if m not in TOKEN_FIT_METHODS and m in served))


def fit_free_form(
    calibrate: Split,
    test: Split | None = None,
    *,
    grader: Grader = exact_match,
    kind: str = "auto",
    targets: Sequence[float] = DEFAULT_TARGET_ACCURACIES,
    methods: Sequence[str] | None = None,
    q: float = 0.1,
    n_bins: int = N_BINS,
    seed: int = 0,
    passes: Mapping[str, Split] | None = None,
    test_passes: Mapping[str, Split] | None = None,
    params: Mapping[str, MethodParams] | None = None,
    free_form: str | None = None,
    guarantees: GuaranteeTargets = NO_GUARANTEES,
) -> FreeFormFit:
    """One calibrator per method on (raw, graded) of the calibrate replies; `free_form` the
    fitted method of highest AUROC (or the one forced); per-method report on both splits.

    `calibrate` / `test` are (items, replies) of the main serving pass: the token statistics are
    recomputed from its logprobs, and an extra-work method reads the raws it served there.
    `passes` / `test_passes` give a method the (items, replies) of its own serving pass instead
    (consistency: a document serving it). `methods` None: the token statistics plus each
    extra-work method that served something. `params`: a method's parameters to record (the
    verify question, consistency's k)."""
    if kind == "option_temperature":
        raise ValueError("option_temperature is the option-letter method's; use auto or a "
                         "scalar family for the free-form methods")
    passes = dict(passes or {})
    methods = _present(methods, calibrate, {m: r for m, (_, r) in passes.items()})
    unknown = [m for m in methods if m not in FREE_FORM_FIT_METHODS]
    if unknown:
        raise ValueError(f"cannot fit {', '.join(unknown)}; free-form methods: "
                         f"{', '.join(FREE_FORM_FIT_METHODS)}")
    if free_form is not None and free_form not in methods:
        raise ValueError(f"free_form {free_form!r} is not among the fitted methods "
                         f"({', '.join(methods)})")
    given = dict(params or {})
    samples = {m: method_sample(*passes.get(m, calibrate), m, grader, q) for m in methods}
    entries = {m: fit_method(samples[m], kind, targets, _params(m, q, given), m, n_bins, seed,
                             guarantees) for m in methods}
    fitted = [m for m in methods if entries[m].calibrated]
    aucs = {m: auroc(samples[m].raw, samples[m].correct) if samples[m].raw.size else math.nan
            for m in methods}
    notes: list[str] = []
    correct = graded(calibrate[1], calibrate[0], grader)
    if free_form is not None:
        chosen = free_form
        rule = "free_form = forced by the caller"
        if not entries[chosen].calibrated:
            notes.append(f"{chosen} (forced) has no calibrator: served calibrated: false")
    elif fitted:
        # An AUROC of one class (NaN) ranks nothing: counted as chance.
        chosen = max(fitted, key=lambda m: (aucs[m] if math.isfinite(aucs[m]) else 0.5,
                                            -methods.index(m)))
        rule = "free_form = the fitted method with the highest AUROC on the calibrate split"
    else:
        chosen = "mean" if "mean" in methods else methods[0]
        rule = "free_form = the fitted method with the highest AUROC on the calibrate split"
        notes.append(f"no free-form calibrator fitted ({int(correct.sum())} of {correct.size} "
                     f"short answers right): free-form replies are served calibrated: false")
    report: dict[str, Any] = {
        "rule": rule,
        "calibrate": {
            "n": int(correct.size),
            "served_by_answer": sum(r.confidence.get("method") == "answer"
                                    for r in calibrate[1]),
            "methods": method_report(samples, entries, n_bins),
        },
    }
    if test is not None and len(test[0]):
        t_passes = dict(test_passes or {})
        t_samples = {m: method_sample(*t_passes.get(m, test), m, grader, q) for m in methods}
        report["test"] = {
            "n": len(test[0]),
            "served_by_answer": sum(r.confidence.get("method") == "answer" for r in test[1]),
            "methods": method_report(t_samples, entries, n_bins),
        }
    return FreeFormFit(entries, chosen, report, notes)

"""Choosing the calibrator family by a proper score, held out.

`choose_calibrator` cross-validates every candidate family on the calibrate data (seeded
`n_folds`-fold split, grouped: every item of one question lands in the same fold, so a question
asked several times cannot be fitted and judged at once), applies each fold's fit to its held-out
fold, and scores the out-of-fold predictions of each family by log loss, Brier, ECE and AUROC.

The rule (README, "How a map is chosen"):
1. Eligible: piecewise-constant families (`histogram`, `isotonic`) only with at least
   `MIN_PER_BIN` samples per bin on average in each fold's training part; a family whose held-out
   AUROC is below the raw score's by more than `AUROC_MARGIN`, or by more than twice the raw
   AUROC's standard error where that is larger (Hanley and McNeil; a small sample's ranking is
   partly noise, and a coarser map may lose the noise), is refused: a map must not flatten the
   ranking it was given (a constant map has AUROC 0.5).
2. Lowest held-out log loss wins. Families within one standard error of it (of the paired
   per-item difference: the noise of this sample) tie; among the tied, a smooth map goes before a
   piecewise-constant one (which must win outright, since it costs ties in the ranking), then the
   lowest Brier score, then the simpler family (`FAMILIES` order).
ECE is recorded but never decides: it is not a proper scoring rule (a constant map at the base
rate has ECE near 0 and no information at all).

Families: `identity`, `temperature` (binary `sigmoid(logit(p) / T)`), `platt`, `isotonic`,
`histogram` (all scalar maps of the raw confidence) and, when the option logits are given,
`option_temperature` (multi-class `softmax(z / T)` over the options, `OptionTemperature`; the
scalar map on top of it is the identity). The result says which won and how every candidate did
held out, which merge and `calibserve calibrate` record in the method's `fit` metrics.

A fold whose training part is degenerate for a family (all labels equal: nothing for a scalar map
to learn) serves that fold with the identity, as the final fit would; `platt` alone fits such data
with the constant of Platt's smoothed target, `(n_right + 1) / (n + 2)` (a model that is always
wrong is then served a confidence near 0, not its raw one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from calibserve.calibration._inputs import FloatArray, as_pair
from calibserve.calibration.calibrators import (
    Calibrator,
    HistogramBinning,
    IdentityCalibrator,
    IsotonicCalibrator,
    OptionTemperature,
    PlattScaling,
    TemperatureScaling,
)
from calibserve.calibration.errors import CalibrationError, DegenerateDataError
from calibserve.calibration.metrics import N_BINS, brier, ece
from calibserve.calibration.risk import auroc

__all__ = ["AUROC_MARGIN", "FAMILIES", "MIN_PER_BIN", "SCALAR_FAMILIES", "FamilyChoice",
           "HeldOut", "OptionLogits", "auroc_standard_error", "choose_calibrator", "fit_family"]

SCALAR_FAMILIES: dict[str, type[Calibrator]] = {
    "identity": IdentityCalibrator,
    "temperature": TemperatureScaling,
    "platt": PlattScaling,
    "histogram": HistogramBinning,
    "isotonic": IsotonicCalibrator,
}
# Order = tie-break preference: fewer parameters first.
FAMILIES: tuple[str, ...] = (
    "identity", "temperature", "option_temperature", "platt", "histogram", "isotonic",
)
# Families with one value per bin or block: they need data in every bin and they create ties.
PIECEWISE = ("histogram", "isotonic")
# A piecewise family is a candidate only with this many training samples per bin on average.
MIN_PER_BIN = 20
# A family whose held-out AUROC falls more than this (or 2 standard errors of the raw AUROC,
# when larger) below the raw score's is refused by `auto`.
AUROC_MARGIN = 0.02
_LOG_EPS = 1e-12


@dataclass(frozen=True)
class OptionLogits:
    """What the multi-class temperature is fitted on, row for row with the confidences.

    `logits`: option-letter token logprobs `[n, m]` (-inf where absent); `groups[c]`: the option
    index of column `c`; `prediction`: the option each row answered; `gold`: the right option.
    """

    logits: NDArray[np.float64]
    groups: NDArray[np.intp]
    prediction: NDArray[np.intp]
    gold: NDArray[np.intp]

    def rows(self, idx: NDArray[np.intp]) -> OptionLogits:
        return OptionLogits(self.logits[idx], self.groups, self.prediction[idx], self.gold[idx])


@dataclass(frozen=True)
class HeldOut:
    """One candidate family's out-of-fold scores; `refused` says why `auto` may not pick it."""

    log_loss: float
    brier: float
    ece: float
    auroc: float | None
    refused: str | None = None

    def to_dict(self) -> dict[str, float | str | None]:
        out: dict[str, float | str | None] = {
            "log_loss": self.log_loss, "brier": self.brier, "ece": self.ece, "auroc": self.auroc}
        if self.refused:
            out["refused"] = self.refused
        return out


@dataclass(frozen=True)
class FamilyChoice:
    """The chosen family, fitted on all the data, and how every candidate did held out."""

    family: str
    calibrator: Calibrator  # the scalar map served on top of the raw (tempered) confidence
    temperature: float = 1.0  # the `answer` method's multi-class temperature
    held_out: dict[str, HeldOut] = field(default_factory=dict)
    selection: str = ""  # how the choice was made, for the document's fit metrics
    notes: list[str] = field(default_factory=list)

    @property
    def held_out_ece(self) -> dict[str, float]:
        """Every candidate's held-out ECE (the v2 document's `held_out_ece`)."""
        return {f: h.ece for f, h in self.held_out.items()}

    def held_out_dict(self) -> dict[str, dict[str, float | str | None]]:
        return {f: h.to_dict() for f, h in self.held_out.items()}

    def raw(self, conf: ArrayLike, options: OptionLogits | None = None) -> FloatArray:
        """The raw confidence as served (the option temperature applied when it was chosen)."""
        if self.temperature != 1.0:
            if options is None:
                raise CalibrationError("the option temperature needs the option logits")
            return OptionTemperature(self.temperature).confidence(
                options.logits, options.prediction, options.groups
            )
        return np.clip(np.asarray(conf, dtype=np.float64).reshape(-1), 0.0, 1.0)

    def apply(self, conf: ArrayLike, options: OptionLogits | None = None) -> FloatArray:
        """The served (calibrated) confidence."""
        return np.asarray(self.calibrator.apply(self.raw(conf, options)), dtype=np.float64)


def fit_family(
    family: str, conf: ArrayLike, correct: ArrayLike, options: OptionLogits | None = None
) -> tuple[Calibrator, float]:
    """Fit one family: (scalar map on top, option temperature). Degenerate: identity, 1.0."""
    if family == "option_temperature":
        if options is None:
            raise CalibrationError("option_temperature needs the option logits")
        t = OptionTemperature().fit(options.logits, options.gold, options.groups).temperature
        return IdentityCalibrator(), t
    if family == "platt":
        c, y = as_pair(conf, correct)
        if np.all(y == y[0]):
            # Single-class data (a model always wrong, say): PlattScaling.fit refuses it, but
            # Platt's smoothed target (n_right + 1) / (n + 2) is still the best constant map, and
            # far better than serving the raw confidence.
            p = (float(y.sum()) + 1.0) / (y.size + 2.0)
            return PlattScaling(0.0, float(np.log(p) - np.log1p(-p))), 1.0
    if family not in SCALAR_FAMILIES:
        raise CalibrationError(
            f"unknown calibrator family {family!r}; valid: {', '.join(FAMILIES)}"
        )
    return SCALAR_FAMILIES[family]().fit(conf, correct), 1.0


def _fit_or_identity(
    family: str, conf: FloatArray, correct: FloatArray, options: OptionLogits | None
) -> tuple[Calibrator, float, str | None]:
    try:
        cal, t = fit_family(family, conf, correct, options)
    except DegenerateDataError as exc:
        return IdentityCalibrator(), 1.0, str(exc)
    return cal, t, None


def _served(
    cal: Calibrator, t: float, conf: FloatArray, options: OptionLogits | None
) -> FloatArray:
    raw = conf
    if t != 1.0 and options is not None:
        raw = OptionTemperature(t).confidence(options.logits, options.prediction, options.groups)
    return np.asarray(cal.apply(raw), dtype=np.float64)


def _item_log_loss(p: FloatArray, y: FloatArray) -> FloatArray:
    q = np.clip(p, _LOG_EPS, 1.0 - _LOG_EPS)
    out: FloatArray = -(y * np.log(q) + (1.0 - y) * np.log1p(-q))
    return out


def auroc_standard_error(area: float, n_right: int, n_wrong: int) -> float:
    """Hanley and McNeil's (1982) standard error of an AUROC from its positives and negatives."""
    if n_right == 0 or n_wrong == 0 or not np.isfinite(area):
        return float("nan")
    q1, q2 = area / (2.0 - area), 2.0 * area * area / (1.0 + area)
    var = (area * (1.0 - area) + (n_right - 1) * (q1 - area * area)
           + (n_wrong - 1) * (q2 - area * area)) / (n_right * n_wrong)
    return float(np.sqrt(max(var, 0.0)))


def _finite(x: float) -> float | None:
    return x if np.isfinite(x) else None


def _fold_of(n: int, questions: ArrayLike | None, folds: int, seed: int) -> NDArray[np.intp]:
    """Each item's fold: whole questions shuffled, then dealt round-robin."""
    if questions is None:
        ids = np.arange(n)
    else:
        g = np.asarray(questions).reshape(-1)
        if g.size != n:
            raise CalibrationError("questions and confidences differ in length")
        _, ids = np.unique(g, return_inverse=True)
    n_groups = int(ids.max()) + 1 if n else 0
    fold_of_group = np.empty(n_groups, dtype=np.intp)
    fold_of_group[np.random.default_rng(seed).permutation(n_groups)] = (
        np.arange(n_groups) % folds)
    out: NDArray[np.intp] = fold_of_group[ids]
    return out


def _out_of_fold(fam: str, c: FloatArray, y: FloatArray, options: OptionLogits | None,
                 fold_of: NDArray[np.intp], folds: int) -> FloatArray:
    out = np.empty(c.size)
    for k in range(folds):
        test = np.flatnonzero(fold_of == k)
        train = np.flatnonzero(fold_of != k)
        sub = options.rows(train) if options is not None else None
        cal, t, _ = _fit_or_identity(fam, c[train], y[train], sub)
        held_opts = options.rows(test) if options is not None else None
        out[test] = _served(cal, t, c[test], held_opts)
    return out


def choose_calibrator(
    conf: ArrayLike,
    correct: ArrayLike,
    options: OptionLogits | None = None,
    *,
    families: Sequence[str] | None = None,
    questions: ArrayLike | None = None,
    n_folds: int = 5,
    seed: int = 0,
    n_bins: int = N_BINS,
) -> FamilyChoice:
    """Cross-validate `families` (default: all that the inputs allow) and fit the winner.

    `questions`: one key per item (its question); items sharing a key share a fold. With one family
    given, that family is fitted whatever its held-out scores (they are still recorded).
    """
    c, y = as_pair(conf, correct)
    if options is not None and options.logits.shape[0] != c.size:
        raise CalibrationError("option logits and confidences differ in length")
    candidates = [
        f for f in (families or FAMILIES) if f != "option_temperature" or options is not None
    ]
    unknown = [f for f in candidates if f not in FAMILIES]
    if unknown or not candidates:
        raise CalibrationError(
            f"unknown calibrator families {unknown}; valid: {', '.join(FAMILIES)}"
        )
    if questions is not None and np.asarray(questions).reshape(-1).size != c.size:
        raise CalibrationError("questions and confidences differ in length")
    n_groups = c.size if questions is None else np.unique(np.asarray(questions).reshape(-1)).size
    folds = min(int(n_folds), n_groups // 2)
    notes: list[str] = []
    held: dict[str, HeldOut] = {}
    if folds >= 2:
        fold_of = _fold_of(c.size, questions, folds, seed)
        raw_auroc = auroc(c, y)
        n_right = int(np.sum(y > 0.5))
        se = auroc_standard_error(raw_auroc, n_right, c.size - n_right)
        margin = max(AUROC_MARGIN, 2.0 * float(np.nan_to_num(se)))
        smallest_train = int(min(np.sum(fold_of != k) for k in range(folds)))
        losses: dict[str, FloatArray] = {}
        for fam in candidates:
            out = _out_of_fold(fam, c, y, options, fold_of, folds)
            losses[fam] = _item_log_loss(out, y)
            area = auroc(out, y)
            refused = None
            if fam in PIECEWISE and smallest_train < MIN_PER_BIN * n_bins:
                refused = (f"{smallest_train} training samples per fold: fewer than {MIN_PER_BIN} "
                           f"per bin ({n_bins} bins)")
            elif np.isfinite(raw_auroc) and np.isfinite(area) and area < raw_auroc - margin:
                refused = (f"held-out AUROC {area:.3f} is more than {margin:.3f} below the raw "
                           f"score's {raw_auroc:.3f}")
            held[fam] = HeldOut(float(losses[fam].mean()), brier(out, y), ece(out, y, n_bins),
                                _finite(area), refused)
        eligible = [f for f in candidates if held[f].refused is None] or ["identity"]
        if "identity" in eligible and "identity" not in held:
            # Every candidate was refused: the raw score, recorded like the others.
            out = np.clip(c, 0.0, 1.0)
            losses["identity"] = _item_log_loss(out, y)
            held["identity"] = HeldOut(float(losses["identity"].mean()), brier(out, y),
                                       ece(out, y, n_bins), _finite(auroc(out, y)))
        lowest = min(eligible, key=lambda f: (held[f].log_loss, FAMILIES.index(f)))

        def ties(f: str) -> bool:
            d = losses[f] - losses[lowest]
            se = float(np.std(d, ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
            return float(d.mean()) <= se

        best = min((f for f in eligible if ties(f)),
                   key=lambda f: (f in PIECEWISE, held[f].brier, FAMILIES.index(f)))
        grouped = "" if questions is None else f", grouped by question ({n_groups} questions)"
        how = (f"{folds}-fold cross-validation (seed {seed}{grouped}): lowest held-out log loss "
               f"({lowest}); within one standard error of it, a smooth map before a piecewise "
               f"one, then the lowest Brier; piecewise maps need {MIN_PER_BIN} samples per bin, "
               f"and no map may lose more than {margin:.3f} of the raw score's AUROC")
        refusals = [f"{f} refused: {h.refused}" for f, h in held.items() if h.refused]
        if len(candidates) > 1:
            notes += refusals
    else:
        best = candidates[0] if len(candidates) == 1 else "identity"
        how = f"too few items ({c.size}) to cross-validate"
        notes.append(how + f": {best} is used")
    if len(candidates) == 1:
        best = candidates[0]
    cal, t, why = _fit_or_identity(best, c, y, options)
    if why is not None:
        notes.append(f"{best} not fitted ({why}); the identity map is used")
        best = "identity"
    return FamilyChoice(best, cal, t, held, how, notes)

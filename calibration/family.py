"""Choosing the calibrator family by held-out ECE.

`choose_calibrator` cross-validates every candidate family on the calibrate data (seeded
`n_folds`-fold split; each family is fitted on the other folds and applied to the held-out one),
computes one ECE (`N_BINS` equal-width bins) over all out-of-fold predictions per family, picks
the lowest (ties: the earlier, simpler family in `FAMILIES`), and refits the winner on all the data.

Families: `identity`, `temperature` (binary `sigmoid(logit(p) / T)`), `platt`, `isotonic`,
`histogram` (all scalar maps of the raw confidence) and, when the option logits are given,
`option_temperature` (multi-class `softmax(z / T)` over the options, `OptionTemperature`; the
scalar map on top of it is the identity). The result says which won and every family's held-out
ECE, which merge and `calibserve calibrate` record in the method's `fit` metrics.

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
from calibserve.calibration.metrics import N_BINS, ece

__all__ = ["FAMILIES", "SCALAR_FAMILIES", "FamilyChoice", "OptionLogits", "choose_calibrator",
           "fit_family"]

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
class FamilyChoice:
    """The chosen family, fitted on all the data, and how every candidate did held out."""

    family: str
    calibrator: Calibrator  # the scalar map served on top of the raw (tempered) confidence
    temperature: float = 1.0  # the `answer` method's multi-class temperature
    held_out_ece: dict[str, float] = field(default_factory=dict)
    selection: str = ""  # how the choice was made, for the document's fit metrics
    notes: list[str] = field(default_factory=list)

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


def choose_calibrator(
    conf: ArrayLike,
    correct: ArrayLike,
    options: OptionLogits | None = None,
    *,
    families: Sequence[str] | None = None,
    n_folds: int = 5,
    seed: int = 0,
    n_bins: int = N_BINS,
) -> FamilyChoice:
    """Cross-validate `families` (default: all that the inputs allow) and fit the winner."""
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
    folds = min(int(n_folds), c.size // 2)
    notes: list[str] = []
    held: dict[str, float] = {}
    if folds >= 2:
        perm = np.random.default_rng(seed).permutation(c.size)
        fold_of = np.empty(c.size, dtype=np.intp)
        fold_of[perm] = np.arange(c.size) % folds
        per_fold: dict[str, list[float]] = {}
        for fam in candidates:
            out = np.empty(c.size)
            per_fold[fam] = []
            for k in range(folds):
                test = np.flatnonzero(fold_of == k)
                train = np.flatnonzero(fold_of != k)
                sub = options.rows(train) if options is not None else None
                cal, t, _ = _fit_or_identity(fam, c[train], y[train], sub)
                held_opts = options.rows(test) if options is not None else None
                out[test] = _served(cal, t, c[test], held_opts)
                per_fold[fam].append(ece(out[test], y[test], n_bins))
            held[fam] = ece(out, y, n_bins)
        lowest = min(candidates, key=lambda f: (held[f], FAMILIES.index(f)))
        # One-standard-error rule: the simplest family within the noise of the lowest ECE. Binned
        # ECE cannot see miscalibration inside a bin, so a map with one value per bin (histogram)
        # scores a little lower than a smooth one even where the smooth one is the truth.
        se = float(np.std(per_fold[lowest], ddof=1) / np.sqrt(folds))
        best = min((f for f in candidates if held[f] <= held[lowest] + se), key=FAMILIES.index)
        how = (f"{folds}-fold cross-validation (seed {seed}): ECE ({n_bins} bins) over the "
               f"out-of-fold predictions; the simplest family within one standard error "
               f"({se:.4f}) of the lowest ({lowest})")
    else:
        best = candidates[0] if len(candidates) == 1 else "identity"
        how = f"too few items ({c.size}) to cross-validate"
        notes.append(how + f": {best} is used")
    cal, t, why = _fit_or_identity(best, c, y, options)
    if why is not None:
        notes.append(f"{best} not fitted ({why}); the identity map is used")
        best = "identity"
    return FamilyChoice(best, cal, t, held, how, notes)

"""Online recalibration: refit a calibrator on recent labelled samples, judged on newer ones.

Pure math on (raw confidence, correct) pairs in arrival order; the server (server/recalibration.py)
collects them from probes and accepted feedback and decides what to do with the verdict.

`refit` holds out the newest `validate_fraction` of the window, fits `family` on the older part,
and compares the candidate's ECE with the current map's on the held-out part: the candidate is
`better` only if it lowers that ECE by at least `margin` AND the gain is not noise. Binned ECE on a
few hundred samples moves by several hundredths by chance (a calibrated map scores 0.09 on 60
samples as easily as 0.04), so the margin alone would swap on luck; the second condition is a
paired test on the same held-out samples: the per-sample Brier score improvement
`(p_current - y)^2 - (p_candidate - y)^2` must have a mean more than `z` (2.326, one-sided
p < 0.01) standard errors above zero. Holding out the newest samples (rather
than a random split) asks what matters after a drift: does the new map fit the engine as it is
now. Thresholds for the map are recomputed on the whole window (`thresholds_for`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from calibserve.calibration.calibrators import Calibrator
from calibserve.calibration.errors import CalibrationError
from calibserve.calibration.family import fit_family
from calibserve.calibration.metrics import N_BINS, ece
from calibserve.calibration.risk import threshold_for_accuracy

__all__ = ["RefitResult", "confidence_quantiles", "escalation_rate", "refit", "thresholds_for"]


@dataclass(frozen=True)
class RefitResult:
    """A candidate map and how it and the current one did on the held-out newest samples."""

    candidate: Calibrator
    family: str
    current_ece: float
    candidate_ece: float
    n_fit: int
    n_validate: int
    margin: float
    brier_gain_z: float = 0.0  # paired z of the candidate's Brier improvement on the held out
    z: float = 2.326

    @property
    def better(self) -> bool:
        return self.candidate_ece <= self.current_ece - self.margin and self.brier_gain_z >= self.z


def _clip(values: np.ndarray) -> np.ndarray:
    out = np.clip(values, 0.0, 1.0)
    return np.where(np.isnan(out), 0.0, out)


def refit(raw: ArrayLike, correct: ArrayLike, current: Calibrator, *, family: str = "temperature",
          validate_fraction: float = 0.3, margin: float = 0.02, n_bins: int = N_BINS,
          ) -> RefitResult:
    """Fit `family` on the older samples, validate against `current` on the newest."""
    r = np.asarray(raw, np.float64)
    y = np.asarray(correct, np.float64)
    if r.shape != y.shape or r.ndim != 1:
        raise CalibrationError("raw and correct must be 1-D and of one length")
    if not 0.0 < validate_fraction < 1.0:
        raise CalibrationError(f"validate_fraction must be in (0, 1), got {validate_fraction!r}")
    n_val = max(1, int(round(r.size * validate_fraction)))
    n_fit = r.size - n_val
    if n_fit < 2:
        raise CalibrationError(f"too few samples to refit ({r.size})")
    candidate, _ = fit_family(family, r[:n_fit], y[:n_fit])
    val_r, val_y = r[n_fit:], y[n_fit:]
    p_cur = _clip(np.asarray(current.apply(val_r), np.float64))
    p_new = _clip(np.asarray(candidate.apply(val_r), np.float64))
    gain = (p_cur - val_y) ** 2 - (p_new - val_y) ** 2
    sd = float(np.std(gain, ddof=1)) if gain.size > 1 else 0.0
    mean = float(np.mean(gain))
    z = mean / (sd / math.sqrt(gain.size)) if sd > 0 else (math.inf if mean > 0 else 0.0)
    return RefitResult(
        candidate=candidate, family=family,
        current_ece=ece(p_cur, val_y, n_bins), candidate_ece=ece(p_new, val_y, n_bins),
        n_fit=n_fit, n_validate=int(val_r.size), margin=margin, brier_gain_z=z,
    )


def thresholds_for(calibrated: ArrayLike, correct: ArrayLike, targets: Sequence[float]
                   ) -> list[dict[str, float]]:
    """Per accuracy target the lowest threshold reaching it on these samples (targets no
    threshold reaches are left out, as merge leaves them out)."""
    out = []
    for target in targets:
        t = threshold_for_accuracy(calibrated, correct, target)
        if t["accuracy"] is None or not math.isfinite(float(t["threshold"] or math.inf)):
            continue
        out.append({"target_accuracy": float(target), "threshold": float(t["threshold"] or 0),
                    "coverage": float(t["coverage"] or 0), "accuracy": float(t["accuracy"])})
    return out


def confidence_quantiles(confidence: ArrayLike) -> list[float]:
    """0%, 1%, ..., 100% quantiles of a served confidence: the drift reference a calibration
    document records for the data its map was fitted on (`fit.confidence_quantiles`)."""
    c = np.clip(np.asarray(confidence, np.float64), 0.0, 1.0)
    q = np.quantile(c, np.linspace(0.0, 1.0, 101))
    return [float(x) for x in np.maximum.accumulate(q)]


def escalation_rate(calibrated: ArrayLike, threshold: float | None) -> float:
    """Fraction of `calibrated` strictly below `threshold` (what a threshold policy escalates)."""
    c = np.asarray(calibrated, np.float64)
    if threshold is None or c.size == 0:
        return 0.0
    return float(np.mean(c < threshold))

"""Calibration and accuracy metrics over a labelled set of (confidence, correct) pairs.

Binning (shared with `CalibrationAccumulator` and the server's per-bin Prometheus counters):
`n_bins` equal-width bins; bin `i` holds confidences in `[i/n, (i+1)/n)` and a confidence of
exactly 1.0 belongs to the last bin. Concretely `bin = min(floor(conf * n), n - 1)` after
clipping the confidence to [0, 1].

Binned errors (`ece`, `mce`, `rms_ce`, `equal_mass_ece`) are sums over bins and are 0.0 on
empty input; per-sample means (`brier`, `nll`, `accuracy`, `mean_confidence`) are undefined on
empty input and raise `DegenerateDataError`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from calibserve.calibration._inputs import (
    FloatArray,
    as_confidences,
    as_labels,
    as_pair,
    check_n_bins,
)
from calibserve.calibration.errors import CalibrationError, DegenerateDataError

__all__ = [
    "N_BINS",
    "Norm",
    "bin_index",
    "binned_error",
    "bin_stats",
    "ece",
    "mce",
    "rms_ce",
    "equal_mass_ece",
    "brier",
    "nll",
    "accuracy",
    "mean_confidence",
    "reliability_diagram",
]

# The binning of every calibserve number: metrics, fit reports, live per-bin counters, dashboards.
N_BINS = 15

Norm = Literal["l1", "l2", "max"]
NORMS: tuple[str, ...] = ("l1", "l2", "max")


def bin_index(conf: ArrayLike, n_bins: int = N_BINS) -> NDArray[np.intp]:
    """Bin of each confidence: `[i/n, (i+1)/n)`, with 1.0 in the last bin (inputs clipped)."""
    n = check_n_bins(n_bins)
    c = as_confidences(conf)
    return np.minimum((c * n).astype(np.intp), n - 1)


def bin_stats(
    conf: ArrayLike, correct: ArrayLike, n_bins: int = N_BINS
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per-bin (counts, confidence sums, correct sums), the sufficient statistics of ECE."""
    n = check_n_bins(n_bins)
    c, y = as_pair(conf, correct, allow_empty=True)
    idx = np.minimum((c * n).astype(np.intp), n - 1)
    # bincount with weights is a single pass in C: this is what makes batch ECE fast.
    counts = np.bincount(idx, minlength=n).astype(np.float64)
    conf_sum: FloatArray = np.bincount(idx, weights=c, minlength=n)  # type: ignore[assignment]
    correct_sum: FloatArray = np.bincount(idx, weights=y, minlength=n)  # type: ignore[assignment]
    return counts, conf_sum, correct_sum


def binned_error(
    counts: ArrayLike, conf_sum: ArrayLike, correct_sum: ArrayLike, norm: str = "l1"
) -> float:
    """Calibration error from per-bin sufficient statistics.

    `l1`: sum over bins of (n_b / N) |acc_b - conf_b| (ECE); `l2`: the square root of the same
    weighted mean of squared gaps (RMS calibration error, torchmetrics' `l2` without debiasing);
    `max`: the largest gap over non-empty bins (MCE). 0.0 when there are no samples.
    """
    if norm not in NORMS:
        raise CalibrationError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    n_b = np.asarray(counts, dtype=np.float64)
    total = float(n_b.sum())
    if total == 0.0:
        return 0.0
    diff = np.abs(np.asarray(conf_sum, dtype=np.float64) - np.asarray(correct_sum, np.float64))
    if norm == "l1":
        # sum_b n_b/N * |S_conf/n_b - S_acc/n_b| == sum_b |S_conf - S_acc| / N
        return float(diff.sum() / total)
    nonempty = n_b > 0
    gap = diff[nonempty] / n_b[nonempty]
    if norm == "max":
        return float(gap.max())
    return float(np.sqrt(np.sum(n_b[nonempty] * gap * gap) / total))


def ece(conf: ArrayLike, correct: ArrayLike, n_bins: int = N_BINS, norm: str = "l1") -> float:
    """Expected calibration error with equal-width bins (`norm`: l1 = ECE, l2 = RMS, max = MCE)."""
    if norm not in NORMS:
        raise CalibrationError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    return binned_error(*bin_stats(conf, correct, n_bins), norm=norm)


def mce(conf: ArrayLike, correct: ArrayLike, n_bins: int = N_BINS) -> float:
    """Maximum calibration error: the largest |accuracy - confidence| over non-empty bins."""
    return ece(conf, correct, n_bins, norm="max")


def rms_ce(conf: ArrayLike, correct: ArrayLike, n_bins: int = N_BINS) -> float:
    """Root-mean-square calibration error (count-weighted over bins)."""
    return ece(conf, correct, n_bins, norm="l2")


def equal_mass_ece(conf: ArrayLike, correct: ArrayLike, n_bins: int = N_BINS) -> float:
    """ECE with adaptive bins holding (almost) equal numbers of samples, sorted by confidence.

    Samples are sorted by confidence (stable) and split into `n_bins` contiguous groups whose
    sizes differ by at most one (`numpy.array_split`); fewer samples than bins gives one-sample
    bins. Ties across a group boundary may fall in different groups.
    """
    n = check_n_bins(n_bins)
    c, y = as_pair(conf, correct, allow_empty=True)
    if c.size == 0:
        return 0.0
    order = np.argsort(c, kind="stable")
    groups = min(n, c.size)
    bounds = np.linspace(0, c.size, groups + 1).astype(np.intp)
    # Sum per contiguous group via cumulative sums: O(n) after the sort.
    cs = np.concatenate(([0.0], np.cumsum(c[order])))
    ys = np.concatenate(([0.0], np.cumsum(y[order])))
    diff = np.abs((cs[bounds[1:]] - cs[bounds[:-1]]) - (ys[bounds[1:]] - ys[bounds[:-1]]))
    return float(diff.sum() / c.size)


def brier(conf: ArrayLike, correct: ArrayLike) -> float:
    """Binary Brier score: mean((confidence - correct)^2)."""
    c, y = as_pair(conf, correct)
    return float(np.mean((c - y) ** 2))


def nll(conf: ArrayLike, correct: ArrayLike, eps: float = 1e-12) -> float:
    """Binary negative log-likelihood, confidences clipped to [eps, 1 - eps] so it stays finite."""
    c, y = as_pair(conf, correct)
    p = np.clip(c, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def accuracy(correct: ArrayLike) -> float:
    """Fraction of correct answers."""
    y = as_labels(correct)
    if y.size == 0:
        raise DegenerateDataError("no samples: accuracy is undefined on empty input")
    return float(y.mean())


def mean_confidence(conf: ArrayLike) -> float:
    """Mean of the (clipped) confidences."""
    c = as_confidences(conf)
    if c.size == 0:
        raise DegenerateDataError("no samples: mean confidence is undefined on empty input")
    return float(c.mean())


def reliability_diagram(
    conf: ArrayLike, correct: ArrayLike, n_bins: int = N_BINS
) -> dict[str, list[float] | list[int] | list[float | None]]:
    """Data for a reliability diagram, as JSON-safe lists.

    Returns `bin_edges` (n_bins + 1 floats), `counts` (ints), and per bin `mean_confidence` and
    `accuracy` (None for an empty bin, so the lists serialise to JSON and plot as gaps).
    """
    n = check_n_bins(n_bins)
    counts, conf_sum, correct_sum = bin_stats(conf, correct, n)
    mean_conf: list[float | None] = []
    acc: list[float | None] = []
    for k, s_c, s_y in zip(counts.tolist(), conf_sum.tolist(), correct_sum.tolist(), strict=True):
        mean_conf.append(s_c / k if k else None)
        acc.append(s_y / k if k else None)
    return {
        "bin_edges": [i / n for i in range(n + 1)],
        "counts": [int(k) for k in counts.tolist()],
        "mean_confidence": mean_conf,
        "accuracy": acc,
    }

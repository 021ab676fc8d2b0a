"""Validation and coercion of the (confidence, correct) arrays every metric and fit takes.

Kept in one place so that metrics, accumulators, calibrators and risk-coverage agree on what
is accepted: confidences are finite numbers clipped to [0, 1]; labels are booleans or numbers
in [0, 1] (1 = the answer was right).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from calibserve.calibration.errors import DegenerateDataError

FloatArray = NDArray[np.float64]


def as_confidences(conf: ArrayLike, name: str = "confidences") -> FloatArray:
    """Return `conf` as a 1-D float64 array clipped to [0, 1]; NaN raises DegenerateDataError."""
    arr = np.asarray(conf, dtype=np.float64).reshape(-1)
    if np.isnan(arr).any():
        raise DegenerateDataError(f"{name} contain NaN")
    # Clipping (rather than rejecting) keeps upstream rounding such as 1.0000000002 harmless.
    return np.clip(arr, 0.0, 1.0)


def as_labels(correct: ArrayLike, name: str = "correct") -> FloatArray:
    """Return `correct` as a 1-D float64 array of values in [0, 1]."""
    arr = np.asarray(correct, dtype=np.float64).reshape(-1)
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
        raise DegenerateDataError(f"{name} must be booleans or numbers in [0, 1] (no NaN)")
    return arr


def as_pair(
    conf: ArrayLike, correct: ArrayLike, *, allow_empty: bool = False
) -> tuple[FloatArray, FloatArray]:
    """Validate a (confidences, labels) pair of equal length."""
    c = as_confidences(conf)
    y = as_labels(correct)
    if c.shape != y.shape:
        raise DegenerateDataError(f"confidences and labels differ in length ({c.size} != {y.size})")
    if not allow_empty and c.size == 0:
        raise DegenerateDataError("no samples: the statistic is undefined on empty input")
    return c, y


def check_n_bins(n_bins: int) -> int:
    """Bins must be a positive integer; return it as `int`."""
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise DegenerateDataError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def as_float_list(values: Sequence[float] | FloatArray) -> list[float]:
    """JSON-safe list of Python floats."""
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]

"""A mergeable, serialisable, O(bins)-memory accumulator of calibration statistics.

Each replica of the server keeps one per model and updates it as feedback arrives; replicas'
accumulators merge exactly (the statistics are per-bin sums), and the ECE of an accumulator
equals the batch `metrics.ece` on the same samples. Bins are those of `metrics.bin_index`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from calibserve.calibration._inputs import FloatArray, as_pair, check_n_bins
from calibserve.calibration.errors import CalibrationError
from calibserve.calibration.metrics import N_BINS, NORMS, binned_error

__all__ = ["CalibrationAccumulator"]


class CalibrationAccumulator:
    """Per-bin sample counts, confidence sums and correct sums over equal-width bins.

    `merge` adds another accumulator into this one in place (and returns `self`); `a + b`
    returns a new one. An empty accumulator reports an ECE of 0.0 (no samples, no error).
    """

    __slots__ = ("n_bins", "_counts", "_conf_sum", "_correct_sum")

    def __init__(self, n_bins: int = N_BINS) -> None:
        self.n_bins: int = check_n_bins(n_bins)
        # Python lists, not numpy arrays: a single-sample update touches one element, and list
        # element arithmetic is several times cheaper than numpy scalar indexing.
        self._counts: list[int] = [0] * self.n_bins
        self._conf_sum: list[float] = [0.0] * self.n_bins
        self._correct_sum: list[float] = [0.0] * self.n_bins

    # -- statistics -------------------------------------------------------------------------
    @property
    def counts(self) -> np.ndarray:
        """Samples per bin (int64 copy)."""
        return np.array(self._counts, dtype=np.int64)

    @property
    def conf_sum(self) -> FloatArray:
        """Sum of confidences per bin (float64 copy)."""
        return np.array(self._conf_sum, dtype=np.float64)

    @property
    def correct_sum(self) -> FloatArray:
        """Number (sum of labels) of correct answers per bin (float64 copy)."""
        return np.array(self._correct_sum, dtype=np.float64)

    @property
    def count(self) -> int:
        """Total number of samples."""
        return sum(self._counts)

    def __len__(self) -> int:
        return self.count

    # -- updates ----------------------------------------------------------------------------
    def update(self, conf: float, correct: bool | float) -> None:
        """Add one sample (confidence clipped to [0, 1]; `correct` a bool or a number in [0, 1])."""
        c = float(conf)
        y = float(correct)
        if c != c or y != y:  # NaN check without a function call
            raise CalibrationError("confidence and correct must not be NaN")
        if not 0.0 <= y <= 1.0:
            raise CalibrationError(f"correct must be in [0, 1], got {correct!r}")
        c = 0.0 if c < 0.0 else (1.0 if c > 1.0 else c)
        n = self.n_bins
        b = int(c * n)
        if b >= n:
            b = n - 1
        self._counts[b] += 1
        self._conf_sum[b] += c
        self._correct_sum[b] += y

    def update_many(self, conf: ArrayLike, correct: ArrayLike) -> None:
        """Add many samples at once (vectorised; same result as repeated `update`)."""
        c, y = as_pair(conf, correct, allow_empty=True)
        n = self.n_bins
        idx = np.minimum((c * n).astype(np.intp), n - 1)
        counts = np.bincount(idx, minlength=n)
        conf_sum = np.bincount(idx, weights=c, minlength=n)
        correct_sum = np.bincount(idx, weights=y, minlength=n)
        for b in range(n):
            self._counts[b] += int(counts[b])
            self._conf_sum[b] += float(conf_sum[b])
            self._correct_sum[b] += float(correct_sum[b])

    def merge(self, other: CalibrationAccumulator) -> CalibrationAccumulator:
        """Add `other`'s statistics into this accumulator (bins must match); returns `self`."""
        if not isinstance(other, CalibrationAccumulator):
            raise CalibrationError(f"cannot merge a {type(other).__name__} into an accumulator")
        if other.n_bins != self.n_bins:
            raise CalibrationError(
                f"cannot merge accumulators with different bins ({self.n_bins} != {other.n_bins})"
            )
        for b in range(self.n_bins):
            self._counts[b] += other._counts[b]
            self._conf_sum[b] += other._conf_sum[b]
            self._correct_sum[b] += other._correct_sum[b]
        return self

    def __add__(self, other: CalibrationAccumulator) -> CalibrationAccumulator:
        return self.copy().merge(other)

    def copy(self) -> CalibrationAccumulator:
        """An independent copy."""
        new = CalibrationAccumulator(self.n_bins)
        new._counts = list(self._counts)
        new._conf_sum = list(self._conf_sum)
        new._correct_sum = list(self._correct_sum)
        return new

    def reset(self) -> None:
        """Forget every sample."""
        self._counts = [0] * self.n_bins
        self._conf_sum = [0.0] * self.n_bins
        self._correct_sum = [0.0] * self.n_bins

    # -- read-outs --------------------------------------------------------------------------
    def ece(self, norm: str = "l1") -> float:
        """Calibration error (`l1` ECE, `l2` RMS, `max` MCE); 0.0 when empty."""
        if norm not in NORMS:
            raise CalibrationError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
        return binned_error(self._counts, self._conf_sum, self._correct_sum, norm=norm)

    def mce(self) -> float:
        """Maximum calibration error over non-empty bins; 0.0 when empty."""
        return self.ece("max")

    def accuracy(self) -> float:
        """Fraction correct; NaN when empty (a gauge can export NaN, a division cannot)."""
        n = self.count
        return sum(self._correct_sum) / n if n else math.nan

    def mean_confidence(self) -> float:
        """Mean confidence; NaN when empty."""
        n = self.count
        return sum(self._conf_sum) / n if n else math.nan

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: `{"n_bins", "counts", "conf_sum", "correct_sum"}`."""
        return {
            "n_bins": self.n_bins,
            "counts": list(self._counts),
            "conf_sum": list(self._conf_sum),
            "correct_sum": list(self._correct_sum),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CalibrationAccumulator:
        """Inverse of `to_dict`; validates lengths and signs."""
        try:
            n = check_n_bins(d["n_bins"])
            counts = [int(v) for v in d["counts"]]
            conf_sum = [float(v) for v in d["conf_sum"]]
            correct_sum = [float(v) for v in d["correct_sum"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"malformed accumulator dict: {exc}") from exc
        if not len(counts) == len(conf_sum) == len(correct_sum) == n:
            raise CalibrationError(f"malformed accumulator dict: expected {n} values per field")
        if min(counts) < 0 or min(conf_sum) < 0 or min(correct_sum) < 0:
            raise CalibrationError("malformed accumulator dict: negative statistics")
        acc = cls(n)
        acc._counts, acc._conf_sum, acc._correct_sum = counts, conf_sum, correct_sum
        return acc

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CalibrationAccumulator):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CalibrationAccumulator(n_bins={self.n_bins}, count={self.count})"

"""Calibrators: monotone maps from a raw confidence to a probability of being right.

Each calibrator has `fit(conf, correct) -> self`, a vectorised `apply(conf)` (a float for a
float, an array for an array), `to_dict()` with a `"type"` key, and `calibrator_from_dict(d)`
inverts `to_dict`. Every map is non-decreasing, so calibration never reorders answers (the
risk-coverage curve and escalation order are unchanged, only thresholds move).

- `TemperatureScaling`: `sigmoid(logit(p) / T)`. T is fitted by golden-section search on log T
  minimising binary NLL (`fit`) or the multi-class NLL of `softmax(logits / T)` (`fit_logits`);
  serving always applies the scalar binary form.
- `PlattScaling`: `sigmoid(a * logit(p) + b)`, Newton's method with Platt's smoothed targets;
  `a` is constrained to be >= 0 so the map stays monotone.
- `IsotonicCalibrator`: pool-adjacent-violators (ties in confidence pooled first), applied by
  linear interpolation between the fitted points, clamped outside them. Each pooled block's
  accuracy is shrunk towards the overall accuracy by `PRIOR_STRENGTH` pseudo-observations, so a
  block of a few answers that were all wrong (or all right) is not served 0 (or 1).
- `HistogramBinning`: equal-width bins (those of `metrics.bin_index`), each mapped to its
  accuracy shrunk the same way; an empty bin holds only the prior's pseudo-observations (the
  overall accuracy), and pool-adjacent-violators, weighted by count + prior, makes the map
  monotone. No bin, seen or not, is served exactly 0 or 1 unless every label was.
- `IdentityCalibrator`: the raw confidence, clipped to [0, 1].
- `OptionTemperature`: the multi-class temperature of the option-letter method,
  `softmax(z / T)` over the option logits (NLL-fitted on option logprobs and gold options). It is
  not a scalar map: it is served as the `answer` method's `params.temperature` (which
  `answer_confidence` applies to the top logprobs), with a scalar map on top (the identity).
  Unlike the binary form it reaches every probability (below 0.5 too: a 4-option model that is
  right 20% of the time is served ~0.2).

Fitting on degenerate data (empty, NaN, lengths that differ, all labels equal) raises
`DegenerateDataError`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from calibserve.calibration._inputs import FloatArray, as_float_list, as_pair, check_n_bins
from calibserve.calibration.errors import CalibrationError, DegenerateDataError
from calibserve.calibration.metrics import N_BINS, bin_stats

__all__ = [
    "Calibrator",
    "TemperatureScaling",
    "PlattScaling",
    "IsotonicCalibrator",
    "HistogramBinning",
    "IdentityCalibrator",
    "OptionTemperature",
    "calibrator_from_dict",
    "pool_adjacent_violators",
]

# Confidences are clipped to [EPS, 1 - EPS] before taking logits (and in NLL), so 0 and 1 map to
# large finite logits instead of infinities.
EPS = 1e-12
T_MIN, T_MAX = 1e-2, 1e2
# Pseudo-observations at the overall accuracy added to every bin (histogram) and pooled block
# (isotonic): a Beta prior centred on the base rate. Two is enough that a bin of one wrong answer
# is served about a third of the base rate, not 0; it vanishes next to a bin of a hundred answers.
PRIOR_STRENGTH = 2.0
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _logit(p: FloatArray) -> FloatArray:
    q = np.clip(p, EPS, 1.0 - EPS)
    out: FloatArray = np.log(q) - np.log1p(-q)
    return out


def _sigmoid(x: FloatArray) -> FloatArray:
    # tanh form: no overflow warnings for large |x|, accurate near 0.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _binary_nll(p: FloatArray, y: FloatArray) -> float:
    # Same clipping as metrics.nll, so "fitting never raises NLL" holds for that metric too.
    q = np.clip(p, EPS, 1.0 - EPS)
    return float(-np.mean(y * np.log(q) + (1.0 - y) * np.log1p(-q)))


def _golden_min(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-7) -> float:
    """Minimiser of a unimodal function on [lo, hi] by golden-section search."""
    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def _fit_data(conf: ArrayLike, correct: ArrayLike) -> tuple[FloatArray, FloatArray]:
    c, y = as_pair(conf, correct)
    if np.all(y == y[0]):
        raise DegenerateDataError(
            "all labels are equal: a calibrator needs both correct and incorrect examples"
        )
    return c, y


def _shrunk_blocks(fitted: FloatArray, w: FloatArray, prior: float, strength: float) -> FloatArray:
    """Each constant block of a PAV fit shrunk towards `prior` by `strength` pseudo-observations,
    then pooled again (a small block may overtake a large one once shrunk)."""
    starts = np.flatnonzero(np.concatenate(([True], fitted[1:] != fitted[:-1])))
    n = np.add.reduceat(w, starts)
    shrunk = (fitted[starts] * n + strength * prior) / (n + strength)
    pooled = pool_adjacent_violators(shrunk, n + strength)
    return np.repeat(pooled, np.diff(np.concatenate((starts, [fitted.size]))))


def pool_adjacent_violators(y: ArrayLike, w: ArrayLike | None = None) -> FloatArray:
    """Weighted least-squares non-decreasing fit of `y` (in order), by pool-adjacent-violators."""
    yv = np.asarray(y, dtype=np.float64).reshape(-1)
    wv = np.ones_like(yv) if w is None else np.asarray(w, dtype=np.float64).reshape(-1)
    values: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for yi, wi in zip(yv.tolist(), wv.tolist(), strict=True):
        values.append(yi)
        weights.append(wi)
        sizes.append(1)
        # Merge backwards while the last block violates monotonicity.
        while len(values) > 1 and values[-2] > values[-1]:
            w2 = weights[-2] + weights[-1]
            v2 = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w2
            s2 = sizes[-2] + sizes[-1]
            del values[-1], weights[-1], sizes[-1]
            values[-1], weights[-1], sizes[-1] = v2, w2, s2
    return np.repeat(np.asarray(values, dtype=np.float64), sizes)


class Calibrator(ABC):
    """A fitted monotone map from raw confidence to calibrated probability."""

    type_name: ClassVar[str]

    @abstractmethod
    def fit(self, conf: ArrayLike, correct: ArrayLike) -> Calibrator:
        """Fit on raw confidences and 0/1 labels; returns `self`."""

    @abstractmethod
    def _apply(self, c: FloatArray) -> FloatArray:
        """Map clipped confidences (1-D) to calibrated ones."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe parameters, with `"type"`."""

    @overload
    def apply(self, conf: float) -> float: ...

    @overload
    def apply(self, conf: ArrayLike) -> FloatArray: ...

    def apply(self, conf: float | ArrayLike) -> float | FloatArray:
        """Calibrated confidence(s), in [0, 1]; scalar in, scalar out."""
        arr = np.asarray(conf, dtype=np.float64)
        out = np.clip(self._apply(np.clip(arr.reshape(-1), 0.0, 1.0)), 0.0, 1.0)
        if arr.ndim == 0:
            return float(out[0])
        return out.reshape(arr.shape)

    __call__ = apply

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Calibrator):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "type")
        return f"{type(self).__name__}({params})"


class IdentityCalibrator(Calibrator):
    """No calibration: the raw confidence clipped to [0, 1] (used without calibration.json)."""

    type_name = "identity"

    def fit(self, conf: ArrayLike, correct: ArrayLike) -> IdentityCalibrator:
        as_pair(conf, correct, allow_empty=True)
        return self

    def _apply(self, c: FloatArray) -> FloatArray:
        return c

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name}


class TemperatureScaling(Calibrator):
    """`sigmoid(logit(p) / T)`; T > 1 softens over-confidence, T < 1 sharpens."""

    type_name = "temperature"

    def __init__(self, temperature: float = 1.0) -> None:
        t = float(temperature)
        if not (t > 0.0 and math.isfinite(t)):
            raise CalibrationError(f"temperature must be positive and finite, got {temperature!r}")
        self.temperature = t

    def fit(self, conf: ArrayLike, correct: ArrayLike) -> TemperatureScaling:
        """Fit T minimising the binary NLL of `sigmoid(logit(conf) / T)` against `correct`."""
        c, y = _fit_data(conf, correct)
        z = _logit(c)

        def objective(log_t: float) -> float:
            return _binary_nll(_sigmoid(z / math.exp(log_t)), y)

        self.temperature = self._best(objective)
        return self

    def fit_logits(self, logits: ArrayLike, labels: ArrayLike) -> TemperatureScaling:
        """Fit T minimising the NLL of `softmax(logits / T)` (logits `[n, k]`, labels `[n]`).

        Option logprobs work as logits (a constant per row cancels in the softmax). Rows with
        -inf logits (missing options) are fine as long as the labelled option is finite.
        """
        z = np.asarray(logits, dtype=np.float64)
        lab = np.asarray(labels).reshape(-1)
        if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
            raise DegenerateDataError(f"logits must have shape [n>0, k>=2], got {z.shape}")
        if lab.shape[0] != z.shape[0]:
            raise DegenerateDataError(
                f"logits and labels differ in length ({z.shape[0]} != {lab.shape[0]})"
            )
        if np.isnan(z).any():
            raise DegenerateDataError("logits contain NaN")
        if not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0 or lab.max() >= z.shape[1]:
            raise DegenerateDataError(f"labels must be integers in [0, {z.shape[1]})")
        z = np.maximum(z, -1e30)  # -inf (vLLM floor) as a very low finite logit
        z_true = z[np.arange(z.shape[0]), lab]
        if not np.isfinite(z_true).all() or (z_true <= -1e29).any():
            raise DegenerateDataError("a labelled option has no finite logit")

        def objective(log_t: float) -> float:
            s = z / math.exp(log_t)
            peak = s.max(axis=1, keepdims=True)
            lse = peak[:, 0] + np.log(np.exp(s - peak).sum(axis=1))
            return float(np.mean(lse - z_true / math.exp(log_t)))

        self.temperature = self._best(objective)
        return self

    @staticmethod
    def _best(objective: Callable[[float], float]) -> float:
        log_t = _golden_min(objective, math.log(T_MIN), math.log(T_MAX))
        # Golden-section finds the optimum to a tolerance; never return worse than T = 1.
        return math.exp(log_t) if objective(log_t) <= objective(0.0) else 1.0

    def _apply(self, c: FloatArray) -> FloatArray:
        return _sigmoid(_logit(c) / self.temperature)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "temperature": self.temperature}


class PlattScaling(Calibrator):
    """`sigmoid(a * logit(p) + b)` with `a >= 0`."""

    type_name = "platt"

    def __init__(self, a: float = 1.0, b: float = 0.0) -> None:
        if not (math.isfinite(a) and math.isfinite(b)) or a < 0:
            raise CalibrationError(f"Platt parameters must be finite with a >= 0, got {a}, {b}")
        self.a = float(a)
        self.b = float(b)

    def fit(self, conf: ArrayLike, correct: ArrayLike) -> PlattScaling:
        """Newton's method on the logistic loss, with Platt's targets to avoid divergence."""
        c, y = _fit_data(conf, correct)
        x = _logit(c)
        n_pos = float(y.sum())
        n_neg = float(y.size - n_pos)
        # Platt (1999): targets (N+ + 1) / (N+ + 2) and 1 / (N- + 2) keep the optimum finite.
        t = y * (n_pos + 1.0) / (n_pos + 2.0) + (1.0 - y) / (n_neg + 2.0)

        def loss(a: float, b: float) -> float:
            s = a * x + b
            return float(np.mean(np.logaddexp(0.0, s) - t * s))

        a, b = 1.0, 0.0
        cur = loss(a, b)
        for _ in range(100):
            p = _sigmoid(a * x + b)
            g = p - t
            h = p * (1.0 - p) + 1e-12
            grad = np.array([np.mean(g * x), np.mean(g)])
            hess = np.array(
                [[np.mean(h * x * x), np.mean(h * x)], [np.mean(h * x), np.mean(h)]]
            ) + 1e-10 * np.eye(2)
            step = np.linalg.solve(hess, grad)
            lr = 1.0
            while lr > 1e-10:
                na, nb = a - lr * step[0], b - lr * step[1]
                new = loss(na, nb)
                if new <= cur:
                    break
                lr *= 0.5
            else:
                break
            done = abs(cur - new) < 1e-14
            a, b, cur = na, nb, new
            if done:
                break
        if a < 0.0:
            # Anti-correlated confidences: the best monotone Platt map is a constant.
            a, b = 0.0, float(_logit(np.array([t.mean()]))[0])
        self.a, self.b = float(a), float(b)
        return self

    def _apply(self, c: FloatArray) -> FloatArray:
        return _sigmoid(self.a * _logit(c) + self.b)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "a": self.a, "b": self.b}


class IsotonicCalibrator(Calibrator):
    """Non-decreasing step fit by pool-adjacent-violators, interpolated linearly between points."""

    type_name = "isotonic"

    def __init__(self, x: ArrayLike = (0.0, 1.0), y: ArrayLike = (0.0, 1.0), *,
                 prior_strength: float = PRIOR_STRENGTH) -> None:
        xs = np.asarray(x, dtype=np.float64).reshape(-1)
        ys = np.asarray(y, dtype=np.float64).reshape(-1)
        if xs.size == 0 or xs.shape != ys.shape:
            raise CalibrationError("isotonic points need equal, non-zero numbers of x and y")
        if np.any(np.diff(xs) < 0) or np.any(np.diff(ys) < 0):
            raise CalibrationError("isotonic points must be non-decreasing in x and y")
        self.x, self.y = xs, ys
        self.prior_strength = float(prior_strength)

    def fit(self, conf: ArrayLike, correct: ArrayLike) -> IsotonicCalibrator:
        c, y = _fit_data(conf, correct)
        xs, inverse = np.unique(c, return_inverse=True)
        w = np.bincount(inverse).astype(np.float64)
        ymean = np.bincount(inverse, weights=y) / w
        fitted = _shrunk_blocks(pool_adjacent_violators(ymean, w), w, float(y.mean()),
                                self.prior_strength)
        # Only the first and last point of each constant block matter for interpolation.
        keep = np.ones(xs.size, dtype=bool)
        if xs.size > 2:
            same_prev = fitted[1:-1] == fitted[:-2]
            same_next = fitted[1:-1] == fitted[2:]
            keep[1:-1] = ~(same_prev & same_next)
        self.x, self.y = xs[keep], fitted[keep]
        return self

    def _apply(self, c: FloatArray) -> FloatArray:
        return np.interp(c, self.x, self.y)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "x": as_float_list(self.x), "y": as_float_list(self.y)}


class HistogramBinning(Calibrator):
    """Equal-width bins mapped to their (monotonised) accuracy."""

    type_name = "histogram"

    def __init__(self, n_bins: int = N_BINS, values: ArrayLike | None = None, *,
                 prior_strength: float = PRIOR_STRENGTH) -> None:
        self.n_bins = check_n_bins(n_bins)
        if not prior_strength > 0:  # an empty bin would have no value at all
            raise CalibrationError("histogram binning needs a positive prior strength")
        self.prior_strength = float(prior_strength)
        if values is None:
            # Unfitted: bin centres, i.e. approximately the identity.
            vals = (np.arange(self.n_bins) + 0.5) / self.n_bins
        else:
            vals = np.asarray(values, dtype=np.float64).reshape(-1)
            if vals.size != self.n_bins or np.isnan(vals).any() or np.any(np.diff(vals) < 0):
                raise CalibrationError(f"histogram needs {self.n_bins} non-decreasing values")
        self.values = vals

    def fit(self, conf: ArrayLike, correct: ArrayLike) -> HistogramBinning:
        c, y = _fit_data(conf, correct)
        counts, _, correct_sum = bin_stats(c, y, self.n_bins)
        prior = float(y.mean())
        weight = counts + self.prior_strength
        self.values = pool_adjacent_violators(
            (correct_sum + self.prior_strength * prior) / weight, weight)
        return self

    def _apply(self, c: FloatArray) -> FloatArray:
        idx = np.minimum((c * self.n_bins).astype(np.intp), self.n_bins - 1)
        out: FloatArray = self.values[idx]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "n_bins": self.n_bins, "values": as_float_list(self.values)}


def _option_matrix(
    logits: ArrayLike, groups: ArrayLike | None
) -> tuple[FloatArray, NDArray[np.intp], int]:
    """Token logprobs `[n, m]` (-inf: absent), each column's option index, number of options."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise DegenerateDataError(f"logits must have shape [n>0, m>=2], got {z.shape}")
    if np.isnan(z).any():
        raise DegenerateDataError("logits contain NaN")
    g = np.arange(z.shape[1]) if groups is None else np.asarray(groups).reshape(-1)
    if g.shape[0] != z.shape[1] or not np.issubdtype(g.dtype, np.integer) or g.min() < 0:
        raise DegenerateDataError("groups must give a non-negative option index per column")
    k = int(g.max()) + 1
    if k < 2:
        raise DegenerateDataError("the logits name fewer than two options")
    # vLLM's -9999 floor and missing options count as absent (probability 0), as in serving.
    z = np.where(z <= -9999.0, -np.inf, z)
    return z, g.astype(np.intp), k


def _option_log_probs(z: FloatArray, groups: NDArray[np.intp], k: int, t: float) -> FloatArray:
    """log softmax over options of logsumexp(z / T) per option: `answer_confidence`'s formula
    (each token's logprob is divided by T before the tokens naming one option are added up)."""
    s = z / t
    per = np.full((z.shape[0], k), -np.inf)
    for j in range(k):
        cols = s[:, groups == j]
        if cols.shape[1]:
            peak = cols.max(axis=1, keepdims=True)
            safe = np.where(np.isfinite(peak), peak, 0.0)
            with np.errstate(divide="ignore"):
                per[:, j] = safe[:, 0] + np.log(np.exp(cols - safe).sum(axis=1))
    peak = per.max(axis=1, keepdims=True)
    safe = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        lse = safe + np.log(np.exp(per - safe).sum(axis=1, keepdims=True))
    out: FloatArray = per - lse
    return out


class OptionTemperature:
    """Multi-class temperature scaling of the option logits: `softmax(z / T)` over the options.

    `fit(logits, labels, groups=None)`: `logits` are the option-letter token logprobs `[n, m]`
    (-inf or vLLM's -9999 where a token is absent), `groups[c]` the option index of column `c`
    (default: one column per option), `labels` the gold option per row. T minimises the NLL of
    the gold option (golden-section search on log T in [0.01, 100]); no pair of right and wrong
    answers is needed, so it also fits a model that is always wrong. `confidence(logits,
    prediction, groups)` is the probability of each row's predicted option at T: what
    `answer_confidence(top, chosen, options, temperature=T)` returns for the same logprobs.
    """

    type_name: ClassVar[str] = "option_temperature"

    def __init__(self, temperature: float = 1.0) -> None:
        t = float(temperature)
        if not (t > 0.0 and math.isfinite(t)):
            raise CalibrationError(f"temperature must be positive and finite, got {temperature!r}")
        self.temperature = t

    def fit(
        self, logits: ArrayLike, labels: ArrayLike, groups: ArrayLike | None = None
    ) -> OptionTemperature:
        z, g, k = _option_matrix(logits, groups)
        lab = np.asarray(labels).reshape(-1)
        if lab.shape[0] != z.shape[0]:
            raise DegenerateDataError(
                f"logits and labels differ in length ({z.shape[0]} != {lab.shape[0]})"
            )
        if not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0 or lab.max() >= k:
            raise DegenerateDataError(f"labels must be integers in [0, {k})")
        rows = np.arange(z.shape[0])
        # Rows whose gold option has no finite logprob carry no information about T.
        gold_ok = np.isfinite(_option_log_probs(z, g, k, 1.0)[rows, lab])
        if not gold_ok.any():
            raise DegenerateDataError("no row has a finite logprob for its gold option")
        z, lab = z[gold_ok], lab[gold_ok]
        rows = np.arange(z.shape[0])

        def objective(log_t: float) -> float:
            return float(-np.mean(_option_log_probs(z, g, k, math.exp(log_t))[rows, lab]))

        self.temperature = TemperatureScaling._best(objective)
        return self

    def probabilities(self, logits: ArrayLike, groups: ArrayLike | None = None) -> FloatArray:
        """`[n, k]` option probabilities at T."""
        z, g, k = _option_matrix(logits, groups)
        out: FloatArray = np.exp(_option_log_probs(z, g, k, self.temperature))
        return out

    def confidence(
        self, logits: ArrayLike, prediction: ArrayLike, groups: ArrayLike | None = None
    ) -> FloatArray:
        """Probability of each row's predicted option at T."""
        p = self.probabilities(logits, groups)
        pred = np.asarray(prediction, dtype=np.intp).reshape(-1)
        out: FloatArray = p[np.arange(p.shape[0]), pred]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "temperature": self.temperature}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptionTemperature:
        if not isinstance(d, Mapping) or d.get("type") != cls.type_name:
            raise CalibrationError(f"not an {cls.type_name!r} object: {d!r}")
        extra = set(d) - {"type", "temperature"}
        if extra:
            raise CalibrationError(f"bad parameters for {cls.type_name!r}: {sorted(extra)}")
        return cls(d.get("temperature", 1.0))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OptionTemperature):
            return NotImplemented
        return self.temperature == other.temperature

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OptionTemperature(temperature={self.temperature!r})"


_TYPES: dict[str, type[Calibrator]] = {
    cls.type_name: cls
    for cls in (
        TemperatureScaling,
        PlattScaling,
        IsotonicCalibrator,
        HistogramBinning,
        IdentityCalibrator,
    )
}


def calibrator_from_dict(d: Mapping[str, Any]) -> Calibrator:
    """Rebuild a calibrator from `to_dict()` output (the `calibrator` of calibration.json)."""
    if not isinstance(d, Mapping) or "type" not in d:
        raise CalibrationError("calibrator dict must be an object with a 'type'")
    kind = d["type"]
    params = {k: v for k, v in d.items() if k != "type"}
    if kind not in _TYPES:
        raise CalibrationError(f"unknown calibrator type {kind!r}; valid: {', '.join(_TYPES)}")
    try:
        return _TYPES[kind](**params)
    except TypeError as exc:
        raise CalibrationError(f"bad parameters for calibrator {kind!r}: {exc}") from exc

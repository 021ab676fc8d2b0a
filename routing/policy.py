"""Escalation policies: given the primary's calibrated confidence, should a stronger tier answer?

- `ThresholdPolicy(t)`: escalate when confidence < t. `ThresholdPolicy.auto(document,
  target_accuracy, method)` takes t from the thresholds merge wrote into calibration.json for that
  confidence method (the calibrated confidence above which the merged model reached that accuracy
  on held-out data).
- `BudgetPolicy(target_rate, window)`: escalate the least confident `target_rate` fraction of
  traffic. The threshold is the `target_rate` quantile of the last `window` confidences (a running
  quantile over a sorted window), so the escalation rate tracks the target even when the
  confidence distribution drifts, without knowing it in advance.
- `NeverPolicy()`: serve the primary's answer (confidence still attached).
"""

from __future__ import annotations

import bisect
import math
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from calibserve.calibration import CalibrationDocument


@dataclass(frozen=True)
class Decision:
    """What a policy decided; `reason` is a `calibserve_escalations_total` reason."""

    escalate: bool
    threshold: float | None = None
    reason: str | None = None


class Policy(Protocol):
    def decide(self, confidence: float) -> Decision: ...


class NeverPolicy:
    """Never escalate."""

    def decide(self, confidence: float) -> Decision:
        return Decision(escalate=False)

    def __repr__(self) -> str:
        return "NeverPolicy()"


class ThresholdPolicy:
    """Escalate when the calibrated confidence is strictly below `threshold`."""

    reason = "low_confidence"

    def __init__(self, threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def __repr__(self) -> str:
        return f"ThresholdPolicy({self.threshold:g})"

    def decide(self, confidence: float) -> Decision:
        escalate = _finite(confidence) < self.threshold
        return Decision(escalate, self.threshold, self.reason if escalate else None)

    @classmethod
    def auto(
        cls,
        calibration: CalibrationDocument | Mapping[str, Any] | str | os.PathLike[str],
        target_accuracy: float | None = None,
        method: str | None = None,
    ) -> ThresholdPolicy:
        """Threshold from the calibration document's thresholds for `method` (default: its
        multiple-choice method). `calibration` is the typed document, a parsed calibration.json,
        or a path to one (or to the model directory holding it), read by the one loader.

        With `target_accuracy`, the entry for exactly that target, else the entry with the
        smallest target above it (the conservative choice: a higher bar, more escalation).
        Without it, the highest target in the file.
        """
        if isinstance(calibration, CalibrationDocument):
            doc = calibration
        elif isinstance(calibration, Mapping):
            doc = CalibrationDocument.from_dict(calibration)
        else:
            doc = CalibrationDocument.load(calibration)
        name = doc.multiple_choice if method is None else method
        entries = sorted((t.target_accuracy, t.threshold) for t in doc.method(name).thresholds)
        if not entries:
            raise ValueError(f"calibration.json has no thresholds for method {name!r}; "
                             "pass an explicit threshold")
        if target_accuracy is None:
            return cls(entries[-1][1])
        for target, threshold in entries:
            if target >= target_accuracy - 1e-9:
                return cls(threshold)
        known = ", ".join(f"{t:g}" for t, _ in entries)
        raise ValueError(
            f"no threshold for target accuracy {target_accuracy:g} in calibration.json "
            f"for method {name!r} (targets: {known})"
        )


class BudgetPolicy:
    """Escalate the least confident `target_rate` of requests (running quantile threshold)."""

    reason = "budget"

    def __init__(
        self,
        target_rate: float,
        window: int = 1000,
        *,
        min_samples: int = 20,
        initial_threshold: float | None = None,
    ) -> None:
        if not 0.0 <= target_rate <= 1.0:
            raise ValueError(f"target_rate must be in [0, 1], got {target_rate}")
        if window < 1:
            raise ValueError("window must be >= 1")
        self.target_rate = float(target_rate)
        self.window = int(window)
        self.min_samples = max(1, min(int(min_samples), self.window))
        # Used until min_samples confidences were seen; None = do not escalate while warming up.
        self.initial_threshold = initial_threshold
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []

    def __repr__(self) -> str:
        return f"BudgetPolicy(target_rate={self.target_rate:g}, window={self.window})"

    @property
    def threshold(self) -> float | None:
        """The current threshold: the target_rate quantile of the window."""
        n = len(self._sorted)
        if n < self.min_samples:
            return self.initial_threshold
        if self.target_rate >= 1.0:
            return math.inf
        if self.target_rate <= 0.0:
            return -math.inf
        # Strictly below the value at rank floor(r*n): about r of the window, ties excluded.
        return self._sorted[min(n - 1, int(self.target_rate * n))]

    def decide(self, confidence: float) -> Decision:
        conf = _finite(confidence)
        threshold = self.threshold
        self._observe(conf)
        if threshold is None:
            return Decision(False, None, None)
        escalate = conf < threshold
        shown = threshold if math.isfinite(threshold) else None
        return Decision(escalate, shown, self.reason if escalate else None)

    def _observe(self, conf: float) -> None:
        self._recent.append(conf)
        bisect.insort(self._sorted, conf)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]


def _finite(confidence: float | None) -> float:
    # A missing or NaN confidence is treated as no confidence at all: safest is to escalate.
    if confidence is None or math.isnan(confidence):
        return 0.0
    return float(confidence)


"""Escalation policies: given the primary's calibrated confidence, should a stronger tier answer?

- `ThresholdPolicy(t)`: escalate when confidence < t. `ThresholdPolicy.auto(document,
  target_accuracy, method)` takes one threshold per confidence method from the thresholds merge
  wrote into calibration.json (the calibrated confidence above which the model reached that
  accuracy on held-out data), so each reply is judged by the threshold of the method that scored
  it; what an uncalibrated confidence gets is the `uncalibrated` setting.
  `ThresholdPolicy.guaranteed(document, max_error)` takes instead each method's certified
  threshold (`methods.M.guarantees`, calibration/guarantee.py): the one under which the kept
  answers' error rate is at most `max_error` with probability 1 - delta.
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
from typing import Any, Literal, Protocol

from calibserve.calibration import CalibrationDocument


@dataclass(frozen=True)
class Decision:
    """What a policy decided; `reason` is a `calibserve_escalations_total` reason."""

    escalate: bool
    threshold: float | None = None
    reason: str | None = None


class Policy(Protocol):
    def decide(
        self, confidence: float, method: str | None = None, calibrated: bool = True
    ) -> Decision: ...


class NeverPolicy:
    """Never escalate."""

    def decide(
        self, confidence: float, method: str | None = None, calibrated: bool = True
    ) -> Decision:
        return Decision(escalate=False)

    def __repr__(self) -> str:
        return "NeverPolicy()"


UNCALIBRATED_MODES = ("threshold", "escalate", "serve")
Uncalibrated = Literal["threshold", "escalate", "serve"]


class ThresholdPolicy:
    """Escalate when the calibrated confidence is strictly below the threshold of the method
    that scored the reply.

    - `threshold`: the threshold of every method `methods` does not name (None: those are served).
    - `methods`: one threshold per confidence method (`auto` fills it from the document, so an
      option-letter reply is judged by `answer`'s threshold and a free-form one by its own).
    - `uncalibrated` (a documented setting, `--on-uncalibrated`): what a confidence that went
      through no map of its own (`calibrated: false`) gets. `threshold` (default): judged by the
      threshold of the method that scored it if `methods` names it, else by the free-form
      method's (`free_form`) when there is one, else by `threshold` when the policy has no
      per-method thresholds at all (an explicit `--threshold` applies to everything); with none
      of those it is served without escalating. `escalate`: always escalated (reason
      `uncalibrated`). `serve`: never escalated.
    """

    reason = "low_confidence"

    def __init__(
        self,
        threshold: float | None,
        *,
        methods: Mapping[str, float] | None = None,
        free_form: str | None = None,
        uncalibrated: str = "threshold",
    ) -> None:
        for t in [threshold, *(methods or {}).values()]:
            if t is not None and (not 0.0 <= t <= 1.0 or math.isnan(t)):
                raise ValueError(f"threshold must be in [0, 1], got {t}")
        if uncalibrated not in UNCALIBRATED_MODES:
            raise ValueError(f"uncalibrated must be one of {', '.join(UNCALIBRATED_MODES)}, "
                             f"got {uncalibrated!r}")
        self.threshold = None if threshold is None else float(threshold)
        self.methods = {k: float(v) for k, v in (methods or {}).items()}
        self.free_form = free_form
        self.uncalibrated = uncalibrated

    def __repr__(self) -> str:
        if not self.methods and self.uncalibrated == "threshold":
            return f"ThresholdPolicy({self.threshold:g})" if self.threshold is not None \
                else "ThresholdPolicy(None)"
        per = ", ".join(f"{k}={v:g}" for k, v in sorted(self.methods.items()))
        return f"ThresholdPolicy({self.threshold}, methods={{{per}}}, " \
               f"uncalibrated={self.uncalibrated!r})"

    def threshold_for(self, method: str | None, calibrated: bool = True) -> float | None:
        """The threshold a confidence of `method` is judged by (None: served, not judged)."""
        if method is not None and method in self.methods:
            return self.methods[method]
        if calibrated or not self.methods:
            return self.threshold
        # Uncalibrated and not a method with a threshold of its own: the free-form method's.
        return self.methods.get(self.free_form) if self.free_form is not None else None

    def decide(
        self, confidence: float, method: str | None = None, calibrated: bool = True
    ) -> Decision:
        if not calibrated and self.uncalibrated == "escalate":
            return Decision(True, None, "uncalibrated")
        if not calibrated and self.uncalibrated == "serve":
            return Decision(False, None, None)
        threshold = self.threshold_for(method, calibrated)
        if threshold is None:
            return Decision(False, None, None)
        escalate = _finite(confidence) < threshold
        return Decision(escalate, threshold, self.reason if escalate else None)

    @classmethod
    def auto(
        cls,
        calibration: CalibrationDocument | Mapping[str, Any] | str | os.PathLike[str],
        target_accuracy: float | None = None,
        method: str | None = None,
        *,
        uncalibrated: str = "threshold",
    ) -> ThresholdPolicy:
        """Thresholds from the calibration document: one per method that has thresholds for the
        target, and `method`'s (default: the multiple-choice method's) as the default for the
        others. `calibration` is the typed document, a parsed calibration.json, or a path to one
        (or to the model directory holding it), read by the one loader.

        With `target_accuracy`, the entry for exactly that target, else the entry with the
        smallest target above it (the conservative choice: a higher bar, more escalation).
        Without it, the highest target in the file. `method` must have such an entry.
        """
        if isinstance(calibration, CalibrationDocument):
            doc = calibration
        elif isinstance(calibration, Mapping):
            doc = CalibrationDocument.from_dict(calibration)
        else:
            doc = CalibrationDocument.load(calibration)
        name = doc.multiple_choice if method is None else method
        default = _pick(doc, name, target_accuracy)
        per_method: dict[str, float] = {}
        for other in doc.methods:
            try:
                per_method[other] = _pick(doc, other, target_accuracy)
            except ValueError:
                continue  # no thresholds of its own (for this target): judged by the default
        return cls(default, methods=per_method, free_form=doc.free_form,
                   uncalibrated=uncalibrated)

    @classmethod
    def guaranteed(
        cls,
        calibration: CalibrationDocument,
        max_error: float | None = None,
        method: str | None = None,
        *,
        uncalibrated: str = "threshold",
    ) -> ThresholdPolicy:
        """Certified thresholds from the document: per method its certificate for `max_error`
        (exactly it, else the strictest below it; None: the strictest on record), and
        `method`'s (default: the multiple-choice method's, which must have one) for the
        methods without a certificate of their own (those replies are not covered)."""
        name = calibration.multiple_choice if method is None else method
        default = _pick_certified(calibration, name, max_error)
        per_method: dict[str, float] = {}
        for other in calibration.methods:
            try:
                per_method[other] = _pick_certified(calibration, other, max_error)
            except ValueError:
                continue
        return cls(default, methods=per_method, free_form=calibration.free_form,
                   uncalibrated=uncalibrated)


def _pick_certified(doc: CalibrationDocument, name: str, max_error: float | None) -> float:
    g = doc.method(name).guarantee_for(max_error)
    if g is None:
        known = ", ".join(sorted(f"{x.max_error:g}" for x in doc.method(name).guarantees)) \
            or "none"
        wanted = "" if max_error is None else f" at max_error {max_error:g} or stricter"
        raise ValueError(
            f"calibration.json has no certified threshold{wanted} for method {name!r} "
            f"(certified max_error: {known}); certify one with `calibserve calibrate "
            "--max-error` (or merge; for a tier of a route, `calibserve certify`), or serve "
            "another --max-error")
    return g.threshold


def _pick(doc: CalibrationDocument, name: str, target_accuracy: float | None) -> float:
    entries = sorted((t.target_accuracy, t.threshold) for t in doc.method(name).thresholds)
    if not entries:
        raise ValueError(f"calibration.json has no thresholds for method {name!r}; "
                         "pass an explicit threshold")
    if target_accuracy is None:
        return entries[-1][1]
    for target, threshold in entries:
        if target >= target_accuracy - 1e-9:
            return threshold
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

    def decide(
        self, confidence: float, method: str | None = None, calibrated: bool = True
    ) -> Decision:
        # A rank over recent traffic: the method and the label do not change where a reply ranks.
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


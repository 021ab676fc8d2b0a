"""The certified threshold kept true live: `--threshold guaranteed` watched on probes and feedback.

A model served with `threshold: guaranteed` escalates, per confidence method, below the threshold
certified at fit time (calibration/guarantee.py): the answers it keeps were wrong at most
`max_error` of the time with probability 1 - delta, on traffic exchangeable with the calibrate
items. Traffic drifts; this module watches whether the promise still holds.

Every labelled answer of a judged tier (a probe, or accepted feedback for an answer it served)
enters its method's sliding window (the last `window` labelled answers, default 1000) as
(raw confidence, correct). An answer is *kept* when the served map puts it at or above the
method's served threshold (the router's policy, `threshold_for`), so a probe counts as kept
exactly when a client's request with that confidence would have been. The primary is watched,
and on a route of 3+ tiers every middle tier too, by its own certified threshold (the label is
the tier's calibration label, `model:tier`, as for its feedback; a probe reaches it when the
tiers before it would escalate it, server/probes.py).
Per model (or `model:tier`) and method:

- `calibserve_guarantee_kept_answers`, `calibserve_guarantee_kept_errors`: the window's kept
  answers and the wrong ones among them;
- `calibserve_guarantee_kept_error_bound`: their exact (Clopper-Pearson) upper bound at the
  certificate's 1 - delta (1 while nothing is kept: no evidence yet), and
  `calibserve_guarantee_kept_error_lower_bound` the lower one (0 while nothing is kept);
- `calibserve_guarantee_max_error`: the certified alpha. `CalibserveGuaranteeUnverified`
  (deploy/prometheus/rules.yml) fires when the upper bound crosses it on enough kept answers:
  the live answers no longer vouch for the promise (which a healthy threshold, certified at the
  edge of its calibrate sample, also shows now and then on a small window);
  `CalibserveGuaranteeBroken` when the lower bound does: they show, with confidence
  1 - delta, that it is broken;
- `calibserve_guarantee_threshold`: the threshold served.

After a calibrator swap or a re-certification (server/recalibration.py, `--recalibrate on`) the
window is re-scored under what is served now, so the gauges always describe the served policy.
An answer only updates two counts; the bound (an exact binomial root, a few milliseconds) is
computed when /metrics is scraped, not on the feedback or probe path.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from calibserve.calibration import CalibrationDocument, ServedMethod
from calibserve.calibration.guarantee import clopper_pearson_lower, clopper_pearson_upper

__all__ = ["DEFAULT_WINDOW", "GuaranteeMetrics", "KeptWindow", "LiveGuarantee"]

DEFAULT_WINDOW = 1000


class GuaranteeMetrics:
    """The live-guarantee gauges, on the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "method"]
        self.kept = Gauge("calibserve_guarantee_kept_answers",
                          "Kept (not escalated) labelled answers in the live window",
                          labels, registry=registry)
        self.errors = Gauge("calibserve_guarantee_kept_errors",
                            "Wrong answers among the kept labelled answers in the live window",
                            labels, registry=registry)
        self.bound = Gauge("calibserve_guarantee_kept_error_bound",
                           "Clopper-Pearson upper bound (at 1 - delta) of the kept answers' "
                           "error rate in the live window", labels, registry=registry)
        self.lower = Gauge("calibserve_guarantee_kept_error_lower_bound",
                           "Clopper-Pearson lower bound (at 1 - delta) of the kept answers' "
                           "error rate in the live window", labels, registry=registry)
        self.max_error = Gauge("calibserve_guarantee_max_error",
                               "The certified error rate of kept answers (alpha)", labels,
                               registry=registry)
        self.threshold = Gauge("calibserve_guarantee_threshold",
                               "The certified threshold served", labels, registry=registry)


@dataclass
class KeptWindow:
    """The last `size` labelled answers of one method, and the counts of those kept."""

    size: int
    threshold: float
    delta: float

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"window must be >= 1, got {self.size}")
        self.samples: deque[tuple[float, float, bool]] = deque()  # (raw, score, correct)
        self.kept = 0
        self.kept_errors = 0

    def _count(self, score: float, correct: bool, sign: int) -> None:
        if score >= self.threshold:
            self.kept += sign
            self.kept_errors += sign * (not correct)

    def add(self, raw: float, score: float, correct: bool) -> None:
        self.samples.append((raw, score, correct))
        self._count(score, correct, +1)
        if len(self.samples) > self.size:
            _, old_score, old_correct = self.samples.popleft()
            self._count(old_score, old_correct, -1)

    def rescore(self, served: ServedMethod, threshold: float, delta: float) -> None:
        """Every answer re-scored by `served` and judged by `threshold` (what is served now)."""
        self.threshold, self.delta = threshold, delta
        old = list(self.samples)
        self.samples.clear()
        self.kept = self.kept_errors = 0
        for raw, _, correct in old:
            self.add(raw, served.score(raw), correct)

    @property
    def bound(self) -> float:
        """Upper bound at 1 - delta of the kept answers' error rate (1.0: none kept)."""
        return clopper_pearson_upper(self.kept_errors, self.kept, self.delta) if self.kept \
            else 1.0

    @property
    def lower_bound(self) -> float:
        """Lower bound at 1 - delta of the kept answers' error rate (0.0: none kept)."""
        return clopper_pearson_lower(self.kept_errors, self.kept, self.delta) if self.kept \
            else 0.0


class LiveGuarantee:
    """One judged tier of a model under `threshold: guaranteed` (`index` 0: the primary; a
    middle tier of a route of 3+ tiers otherwise): a window per certified method."""

    def __init__(self, model: Any, metrics: GuaranteeMetrics, window: int = DEFAULT_WINDOW,
                 index: int = 0) -> None:
        self.model = model  # server.runtime.ModelRuntime
        self.index = index
        self.tier = model.tiers[index]  # server.runtime.TierRuntime
        self.label: str = model.calibration_label(self.tier.tier.name)
        self.metrics = metrics
        self.window = window
        self.windows: dict[str, KeptWindow] = {}
        self.rescore()

    @property
    def document(self) -> CalibrationDocument:
        doc: CalibrationDocument = self.tier.calibration
        return doc

    def _served(self, method: str) -> ServedMethod | None:
        scorer = self.tier.scorer
        for m in (scorer.multiple_choice, scorer.no_letter, scorer.free_form):
            if m.name == method:
                served: ServedMethod = m
                return served
        return None

    def rescore(self) -> None:
        """Follow what is served now: the certified methods, their thresholds and maps."""
        policy = self.model.route.policy_for(self.index)
        threshold_for = getattr(policy, "threshold_for", None)
        max_error = self.model.settings.max_error
        for method, entry in self.document.methods.items():
            cert = entry.guarantee_for(max_error)
            served = self._served(method)
            threshold = threshold_for(method) if threshold_for is not None else None
            if cert is None or served is None or threshold is None:
                self.windows.pop(method, None)
                continue
            window = self.windows.get(method)
            if window is None:
                window = self.windows[method] = KeptWindow(self.window, threshold, cert.delta)
                self._publish(method, window)
            window.rescore(served, threshold, cert.delta)
            self.metrics.max_error.labels(self.label, method).set(cert.max_error)
            self.metrics.threshold.labels(self.label, method).set(threshold)

    def observe(self, method: str, raw: float, correct: bool) -> None:
        """One labelled answer of this tier (a probe, or feedback for an answer it served)."""
        window = self.windows.get(method)
        served = self._served(method)
        if window is None or served is None or not 0.0 <= raw <= 1.0:
            return
        window.add(float(raw), served.score(float(raw)), bool(correct))

    def _publish(self, method: str, window: KeptWindow) -> None:
        """The window's gauges, read when /metrics is scraped."""
        name = self.label
        self.metrics.kept.labels(name, method).set_function(lambda: window.kept)
        self.metrics.errors.labels(name, method).set_function(lambda: window.kept_errors)
        self.metrics.bound.labels(name, method).set_function(lambda: window.bound)
        self.metrics.lower.labels(name, method).set_function(lambda: window.lower_bound)

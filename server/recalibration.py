"""Online recalibration of a model's primary tier: `--recalibrate off | shadow | on`.

Labelled samples (raw confidence, correct) arrive from probes (server/probes.py) and from accepted
feedback (the signed id carries the raw confidence of each choice), per confidence method, into a
sliding window (`window`, default 1000). Every `every` (100) new samples, once the window holds
`min_samples` (600), `calibration.online.refit` fits a fresh map of the method's family on the
older 70% and compares it with the served map on the newest 30% (a gain of at least `margin` in
ECE and a paired Brier test at p < 0.01: on calibrated windows of 600 to 1000 samples it swaps in
0.2% of refits, on a clearly drifted one in 90%, tests/calibration/test_online.py):

- `shadow`: the candidate's and the served map's held-out ECE are exported
  (`calibserve_recalibration_candidate_ece`, `..._current_ece`); nothing served changes.
- `on`: if the candidate lowers the held-out ECE by `margin` (0.02), it is swapped in atomically
  (one assignment of the tier's frozen `Scorer`: a request in flight keeps the map it started
  with), `calibserve_calibrator_version` goes up, the swap is logged and counted
  (`calibserve_recalibrations_total{outcome="swapped"}`), `auto` thresholds are recomputed for
  their accuracy targets from the new map on the window, the escalation rate the window would
  see before and after is exported (`calibserve_recalibration_escalation_rate{when}`), and the
  new calibration.json is written atomically to `--recalibration-dir` (and `history/vN.json`).
- With `threshold: guaranteed`, every refit also re-certifies the method's certified threshold
  on the window under the map served (`calibration.certify_threshold`, same max_error, delta
  and batch): `shadow` exports the candidate (`calibserve_recalibration_candidate_threshold`); `on`
  swaps it in, the same way as a map, when the served threshold is no longer certified on the
  window or the candidate keeps `RECERTIFY_MARGIN` (5 points) more of it
  (`calibserve_recalibrations_total{outcome="recertified"}`). A window that certifies no
  threshold changes nothing (`outcome="uncertifiable"`, logged): the live bound's alert
  (server/guarantee.py) is the operator's signal. Feedback arrives only for answers the primary
  served, so a window without probes holds few answers below the threshold: re-certification
  can then raise the threshold but hardly lower it (the safe direction).
- A restart with `on` serves the stored document; `off` (or deleting the file) returns to the
  checkpoint's calibration.json: the swap is reversible.

Replicas agree through that directory: it is meant to be a volume every replica mounts (a
shared filesystem the operator already runs: NFS, CephFS or a cloud file store, the kind that
backs deploy/k8s's model PVC, with a ReadWriteMany claim of its own). Before each
refit a replica adopts a stored document whose version is newer than its own, so a swap made by
one replica reaches the others within one refit interval; a replica that has swapped writes only
a version above the stored one. Each replica fits on its own window (probes it sent, feedback it
received), so two replicas may propose different candidates; the last writer wins and the others
adopt it. The cost: a shared writable volume, and up to one refit interval of disagreement.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from calibserve.calibration import CalibrationDocument, ServedMethod
from calibserve.calibration.document import Guarantee
from calibserve.calibration.guarantee import (
    certify_threshold,
    clopper_pearson_upper,
    scan_target,
)
from calibserve.calibration.online import (
    RefitResult,
    confidence_quantiles,
    escalation_rate,
    refit,
    thresholds_for,
)

log = logging.getLogger("calibserve.server.recalibration")

MODES = ("off", "shadow", "on")
HISTORY = "history"
# A re-certified threshold replaces a still-valid one only for this much more coverage.
RECERTIFY_MARGIN = 0.05


class RecalibrationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.version = Gauge("calibserve_calibrator_version",
                             "Version of the served calibrator (0: the checkpoint's)",
                             ["model", "method"], registry=registry)
        self.candidate_ece = Gauge("calibserve_recalibration_candidate_ece",
                                   "Held-out ECE of the latest refitted candidate map",
                                   ["model", "method"], registry=registry)
        self.current_ece = Gauge("calibserve_recalibration_current_ece",
                                 "Held-out ECE of the served map on the same samples",
                                 ["model", "method"], registry=registry)
        self.refits = Counter("calibserve_recalibrations", "Refits by outcome (swapped, kept, "
                              "shadow, adopted)", ["model", "method", "outcome"],
                              registry=registry)
        self.escalation = Gauge("calibserve_recalibration_escalation_rate",
                                "Escalation rate on the window under the map before and after "
                                "the last swap", ["model", "method", "when"], registry=registry)
        self.candidate_threshold = Gauge(
            "calibserve_recalibration_candidate_threshold",
            "Certified threshold re-certified on the window (threshold guaranteed; 1: the "
            "window certifies none)", ["model", "method"], registry=registry)


def _version(doc: CalibrationDocument) -> int:
    info = doc.metrics.get("recalibration")
    return int(info.get("version", 0)) if isinstance(info, dict) else 0


class Recalibrator:
    """One model's online recalibration (its primary tier)."""

    def __init__(self, model: Any, mode: str, store: Path | None, metrics: RecalibrationMetrics,
                 *, window: int = 1000, every: int = 100, min_samples: int = 600,
                 margin: float = 0.02, family: str = "temperature") -> None:
        if mode not in MODES:
            raise ValueError(f"recalibrate must be one of {', '.join(MODES)}, got {mode!r}")
        if model.primary.calibration is None:
            raise ValueError(f"model {model.name!r}: recalibration needs a calibration.json")
        self.model = model  # server.runtime.ModelRuntime
        self.mode = mode
        self.store = None if store is None else Path(store) / model.name
        self.metrics = metrics
        self.window, self.every, self.min_samples = window, every, min_samples
        self.margin, self.family = margin, family
        self._samples: dict[str, deque[tuple[float, bool]]] = {}
        self._new: dict[str, int] = {}
        self.version = _version(model.primary.calibration)
        self.last: dict[str, RefitResult] = {}
        # Called with each document served after a swap or adoption (the fit-time gauges).
        self.on_swap: Callable[[CalibrationDocument], None] | None = None
        for method in self.methods:
            metrics.version.labels(model.name, method).set(self.version)
        if mode == "on":
            self.adopt_stored()

    @property
    def methods(self) -> tuple[str, ...]:
        """The scalar-mapped methods of the primary scorer that can be refitted.

        `no_letter` (a reply to an options prompt that names no letter) joins them when the
        document has an entry for it, with a map or without one (too few such replies at fit
        time): its window is refitted like the others. Without an entry it stays uncalibrated,
        as the document says, and its samples are not collected.
        """
        scorer = self.model.primary.scorer
        names = [scorer.multiple_choice.name, scorer.free_form.name]
        if scorer.no_letter.name in self.document.methods:
            names.append(scorer.no_letter.name)
        return tuple(dict.fromkeys(names))

    @property
    def document(self) -> CalibrationDocument:
        doc: CalibrationDocument = self.model.primary.calibration
        return doc

    # -- samples ------------------------------------------------------------------------------
    def observe(self, method: str, raw: float, correct: bool) -> None:
        """One labelled sample of the primary tier (probe or accepted feedback)."""
        if method not in self.methods or not 0.0 <= raw <= 1.0:
            return
        window = self._samples.setdefault(method, deque(maxlen=self.window))
        window.append((float(raw), bool(correct)))
        self._new[method] = self._new.get(method, 0) + 1
        if self._new[method] >= self.every and len(window) >= self.min_samples:
            self._new[method] = 0
            self.step(method)

    def step(self, method: str) -> RefitResult | None:
        """Refit `method` on its window and act on the verdict as the mode says."""
        if self.mode == "on":
            self.adopt_stored()
        window = self._samples.get(method)
        if not window or len(window) < 3:
            return None
        raw = np.asarray([r for r, _ in window])
        correct = np.asarray([c for _, c in window], np.float64)
        served = self._served(method)
        try:
            result = refit(raw, correct, served.map, family=self.family, margin=self.margin)
        except ValueError as exc:  # CalibrationError: degenerate window
            log.info("model %s, method %s: no refit (%s)", self.model.name, method, exc)
            return None
        self.last[method] = result
        name = self.model.name
        self.metrics.candidate_ece.labels(name, method).set(result.candidate_ece)
        self.metrics.current_ece.labels(name, method).set(result.current_ece)
        if self.mode == "shadow":
            self.metrics.refits.labels(name, method, "shadow").inc()
        elif result.better:
            self._swap(method, result, raw, correct)
        else:
            self.metrics.refits.labels(name, method, "kept").inc()
        self.recertify(method, raw, correct)
        return result

    def recertify(self, method: str, raw: np.ndarray, correct: np.ndarray) -> None:
        """Re-certify `method`'s served certified threshold on the window (module docstring)."""
        settings = self.model.settings
        if settings.threshold != "guaranteed":
            return
        served_cert = self.document.method(method).guarantee_for(settings.max_error)
        if served_cert is None:
            return
        alpha, delta, batch = served_cert.max_error, served_cert.delta, served_cert.batch
        served = self._served(method)
        scores = np.asarray([served.score(float(r)) for r in raw])
        y = np.asarray(correct, dtype=bool)
        starts = served_cert.starts or 1  # re-certified the way it was certified
        candidate = certify_threshold(scores, y, alpha, delta, batch=batch, starts=starts)
        name = self.model.name
        self.metrics.candidate_threshold.labels(name, method).set(
            candidate.threshold if candidate.certified else 1.0)
        if self.mode != "on":
            return
        if not candidate.certified:
            self.metrics.refits.labels(name, method, "uncertifiable").inc()
            log.error("model %s, method %s: the window (%d labelled answers) certifies no "
                      "threshold for max_error %g: %s", name, method, scores.size, alpha,
                      candidate.refusal())
            return
        kept = scores >= served_cert.threshold
        errors = int((kept & ~y).sum())
        target, level = scan_target(alpha, delta, batch)  # a batch certificate's own rate
        still = bool(kept.any()) and clopper_pearson_upper(
            errors, int(kept.sum()), level / starts) <= target
        if still and candidate.coverage < float(kept.mean()) + RECERTIFY_MARGIN:
            return
        data = self.document.to_dict()
        entries = [g for g in data["methods"][method].get("guarantees", [])
                   if abs(g["max_error"] - alpha) > 1e-12]
        fresh = Guarantee.from_certificate(candidate).model_dump(mode="json")
        data["methods"][method]["guarantees"] = sorted([*entries, fresh],
                                                       key=lambda g: g["max_error"])
        version = max(self.version, self._stored_version()) + 1
        data["metrics"] = {**data.get("metrics", {}), "recalibration": {
            "version": version, "method": method, "at": int(time.time()),
            "recertified": {"max_error": alpha, "delta": delta,
                            "threshold_before": served_cert.threshold,
                            "threshold_after": candidate.threshold,
                            "window": int(scores.size)}}}
        doc = CalibrationDocument.from_dict(data)
        self._apply(doc)
        self.metrics.refits.labels(name, method, "recertified").inc()
        self._persist(doc)
        log.warning("model %s, method %s: certified threshold %.4f -> %.4f re-certified on %d "
                    "labelled answers (max_error %g, delta %g; version %d)", name, method,
                    served_cert.threshold, candidate.threshold, scores.size, alpha, delta,
                    self.version)

    # -- serving ------------------------------------------------------------------------------
    def _served(self, method: str) -> ServedMethod:
        scorer = self.model.primary.scorer
        served: ServedMethod = next(
            m for m in (scorer.multiple_choice, scorer.no_letter, scorer.free_form)
            if m.name == method)
        return served

    def _swap(self, method: str, result: RefitResult, raw: np.ndarray,
              correct: np.ndarray) -> None:
        old = self._served(method)
        new = ServedMethod(method, result.candidate)
        before = np.asarray([old.score(float(r)) for r in raw])
        after = np.asarray([new.score(float(r)) for r in raw])
        entry = self.document.method(method)
        targets = [t.target_accuracy for t in entry.thresholds]
        data = self.document.to_dict()
        data["methods"][method]["calibrator"] = result.candidate.to_dict()
        data["methods"][method]["thresholds"] = thresholds_for(after, correct, targets)
        data["methods"][method]["fit"] = {
            "n": result.n_fit, "ece_raw": float(_ece(raw, correct)),
            "ece_calibrated": result.candidate_ece, "calibrator": result.family,
            "accuracy": float(np.mean(correct)),
            # The window is this map's fit data: the label-free drift reference from now on.
            "confidence_quantiles": confidence_quantiles(after),
            "notes": [f"online refit on {result.n_fit} recent labelled samples; held-out ECE "
                      f"{result.current_ece:.4f} -> {result.candidate_ece:.4f} on the newest "
                      f"{result.n_validate}"],
        }
        version = max(self.version, self._stored_version()) + 1
        # The held-out report was the old map's: it says nothing about this one.
        data["metrics"] = {k: v for k, v in data.get("metrics", {}).items() if k != "test"}
        data["metrics"] = {**data["metrics"], "recalibration": {
            "version": version, "method": method, "at": int(time.time()),
            "current_ece": result.current_ece, "candidate_ece": result.candidate_ece}}
        doc = CalibrationDocument.from_dict(data)
        threshold_before = self._threshold(method)
        self._apply(doc)
        threshold_after = self._threshold(method)
        name = self.model.name
        self.metrics.escalation.labels(name, method, "before").set(
            escalation_rate(before, threshold_before))
        self.metrics.escalation.labels(name, method, "after").set(
            escalation_rate(after, threshold_after))
        self.metrics.refits.labels(name, method, "swapped").inc()
        self._persist(doc)
        log.warning("model %s, method %s: calibrator version %d swapped in (held-out ECE %.4f "
                    "-> %.4f on %d samples)", name, method, self.version, result.current_ece,
                    result.candidate_ece, result.n_validate)

    def _threshold(self, method: str) -> float | None:
        policy = self.model.route.policy
        threshold_for = getattr(policy, "threshold_for", None)
        value = threshold_for(method) if threshold_for is not None else None
        return None if value is None else float(value)

    def _apply(self, doc: CalibrationDocument) -> None:
        """Serve `doc`: the scorer in one assignment, then `auto` thresholds from it."""
        from calibserve.calibration import Scorer

        primary = self.model.primary
        scorer = Scorer.from_document(doc)
        primary.calibration = doc
        primary.scorer = scorer
        primary.tier.scorer = scorer  # what the router reads: one atomic assignment
        settings = self.model.settings
        if settings.resolved_policy() == "threshold" \
                and settings.threshold in (None, "auto", "guaranteed") \
                and len(self.model.tiers) > 1:
            self.model.route.policy = self.model._policy()  # noqa: SLF001 - rebuilt from doc
        self.version = _version(doc)
        for method in self.methods:
            self.metrics.version.labels(self.model.name, method).set(self.version)
        if self.on_swap is not None:
            self.on_swap(doc)

    # -- the store ----------------------------------------------------------------------------
    def _stored(self) -> CalibrationDocument | None:
        if self.store is None or not (self.store / "calibration.json").is_file():
            return None
        try:
            return CalibrationDocument.load(self.store / "calibration.json")
        except ValueError as exc:
            log.error("model %s: ignoring the stored calibration (%s)", self.model.name, exc)
            return None

    def _stored_version(self) -> int:
        doc = self._stored()
        return _version(doc) if doc is not None else 0

    def adopt_stored(self) -> bool:
        """Serve the stored document if it is newer than what is served (restart, replicas)."""
        doc = self._stored()
        if doc is None or _version(doc) <= self.version:
            return False
        self._apply(doc)
        for method in self.methods:
            self.metrics.refits.labels(self.model.name, method, "adopted").inc()
        log.warning("model %s: serving stored calibrator version %d", self.model.name,
                    self.version)
        return True

    def _persist(self, doc: CalibrationDocument) -> None:
        if self.store is None:
            return
        (self.store / HISTORY).mkdir(parents=True, exist_ok=True)
        doc.write(self.store / HISTORY / f"v{self.version}.json")
        doc.write(self.store / "calibration.json")


def _ece(raw: np.ndarray, correct: np.ndarray) -> float:
    from calibserve.calibration import ece

    return float(ece(raw, correct))


__all__ = ["MODES", "RecalibrationMetrics", "Recalibrator"]

"""What the drift rules compare live calibration against: the fit, as recorded in calibration.json.

Per model and calibrated method of its primary tier, at start:

- `calibserve_calibration_fit_ece{model, method, split}`: the ECE of the served map recorded at
  fit time, on its fit split (`split="fit"`, `methods.M.fit.ece_calibrated`) and, for the
  multiple-choice method when merge recorded it, on the held-out test split (`split="held_out"`,
  `metrics.test.ece`: the probe split itself). The rules compare live ECE with the larger of the
  two: in-sample ECE flatters the map (the demo's: 0.091 fit, 0.133 held out), and probes are
  held-out data. `calibserve_calibration_fit_samples` is the fit split's sample count;
- `calibserve_calibration_fit_confidence_cdf{model, method, le}`: the fraction of the fit split's
  served confidence at or below each bucket edge of the `calibserve_confidence` histogram (from
  `fit.confidence_quantiles`; absent for documents written before it). The label-free rule
  `model:calibserve_confidence_shift_ks:1h` compares the served histogram against it (a binned
  two-sample Kolmogorov-Smirnov test, deploy/prometheus/rules.yml). The served map is monotone, so
  the shift of the calibrated distribution is the shift of the raw one.

Prometheus does the statistics (fleet-wide, over windows); the server only publishes the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Gauge

from calibserve.calibration import CalibrationDocument
from calibserve.server.metrics import CONFIDENCE_BUCKETS

__all__ = ["FitReference", "reference_cdf"]


def reference_cdf(quantiles: Sequence[float], edges: Sequence[float]) -> list[float]:
    """F(edge) of the distribution whose evenly spaced quantiles are `quantiles` (linear
    between them: the quantile function inverted)."""
    q = np.asarray(quantiles, np.float64)
    levels = np.linspace(0.0, 1.0, q.size)
    out = []
    for edge in edges:
        if edge < q[0]:
            out.append(0.0)
        elif edge >= q[-1]:
            out.append(1.0)
        else:
            # The highest level whose quantile is <= edge, interpolated within the step.
            i = int(np.searchsorted(q, edge, side="right")) - 1
            lo, hi = q[i], q[i + 1]
            frac = 0.0 if hi == lo else (edge - lo) / (hi - lo)
            out.append(float(levels[i] + frac * (levels[i + 1] - levels[i])))
    return out


class FitReference:
    """The fit-time gauges, on the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ece = Gauge("calibserve_calibration_fit_ece",
                         "ECE of the served calibrator recorded at fit time (calibration.json), "
                         "on its fit split or held out", ["model", "method", "split"],
                         registry=registry)
        self.samples = Gauge("calibserve_calibration_fit_samples",
                             "Samples the served calibrator was fitted on",
                             ["model", "method"], registry=registry)
        self.cdf = Gauge("calibserve_calibration_fit_confidence_cdf",
                         "Fraction of the fit split's served confidence <= le",
                         ["model", "method", "le"], registry=registry)

    def publish(self, model: str, doc: CalibrationDocument | None) -> None:
        """Set the gauges of every calibrated method of `doc` (nothing for None)."""
        if doc is None:
            return
        for method, entry in doc.methods.items():
            fit = entry.fit
            if fit is None or not entry.calibrated:
                continue
            self.ece.labels(model, method, "fit").set(fit.ece_calibrated)
            held_out = doc.metrics.get("test")
            if method == doc.multiple_choice and isinstance(held_out, dict) \
                    and isinstance(held_out.get("ece"), int | float):
                self.ece.labels(model, method, "held_out").set(float(held_out["ece"]))
            self.samples.labels(model, method).set(fit.n)
            if fit.confidence_quantiles:
                edges = [*CONFIDENCE_BUCKETS, float("inf")]
                for edge, value in zip(edges, reference_cdf(fit.confidence_quantiles, edges),
                                       strict=True):
                    self.cdf.labels(model, method, _le(edge)).set(value)


def _le(edge: float) -> str:
    """The `le` label as prometheus_client writes a histogram's (`0.1`, `1.0`, `+Inf`)."""
    return "+Inf" if edge == float("inf") else repr(float(edge))

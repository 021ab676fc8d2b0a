"""Prometheus metrics of one server process, with the exact names docs/internals.md lists.

Each runtime owns one registry (`server_registry()`), on which it builds these series and
routing's (`routing.RoutingMetrics`); `/metrics` renders that registry alone, so several apps
(tests, the reliability harness) can live in one process. The per-bin calibration counters are
rendered by hand: prometheus_client would rename `calibserve_calibration_confidence_sum` to
`..._sum_total`, and fleet ECE recording rules rely on the exact names. The ECE gauge is computed
by calibration/'s accumulator from the same pairs.

Confidence series are labelled by `method` (the confidence method that scored the reply): the
ECE of option-letter answers (`answer`) and of free-form ones (`verify`, `mean`, ...) are different
quantities and are never summed into one. The per-bin counters are also labelled by `source`:
`feedback` (users, /v1/feedback) or `probe` (calibserve's own labelled probes, server/probes.py);
the two are kept apart so a quiet feedback channel and a busy probe channel never mix.
"""

from __future__ import annotations

import threading

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from calibserve.calibration import N_BINS, CalibrationAccumulator

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)
_OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0
)
CONFIDENCE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
FEEDBACK = "feedback"  # the `source` of user feedback's per-bin counters
PROBE = "probe"  # the `source` of calibserve's own probes (server/probes.py)


def server_registry() -> CollectorRegistry:
    """A server's one registry, with the process, platform and GC series of the process."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


class ServerMetrics:
    """All server-side series, on `registry` (the server's, shared with routing's series)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "calibserve_requests", "Requests by model, endpoint and outcome",
            ["model", "endpoint", "outcome"], registry=r,
        )
        self.duration = Histogram(
            "calibserve_request_duration_seconds", "Total request time",
            ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.overhead = Histogram(
            "calibserve_proxy_overhead_seconds", "Request time minus time spent upstream",
            ["model", "endpoint"], buckets=_OVERHEAD_BUCKETS, registry=r,
        )
        self.confidence = Histogram(
            "calibserve_confidence", "Calibrated confidence of served choices",
            ["model", "method"], buckets=CONFIDENCE_BUCKETS, registry=r,
        )
        self.ece = Gauge(
            "calibserve_ece", f"ECE ({N_BINS} bins) of accepted feedback on this replica",
            ["model", "method"], registry=r,
        )
        self.feedback = Counter(
            "calibserve_feedback", "Feedback by outcome", ["model", "outcome"], registry=r,
        )
        self.upstream_errors = Counter(
            "calibserve_upstream_errors", "Upstream failures seen by the server",
            ["upstream", "kind"], registry=r,
        )
        self.engine_restarts = Counter(
            "calibserve_engine_restarts", "Managed engine restarts", ["model"], registry=r,
        )
        self.engine_up = Gauge(
            "calibserve_engine_up", "1 when the managed engine answers health checks",
            ["model"], registry=r,
        )
        # The HTTP server's connections (server/connections.py): the gauge reads the count at
        # each scrape.
        self.open_connections = Gauge(
            "calibserve_open_connections", "Client connections open now (this process)",
            registry=r,
        )
        self.connections_refused = Counter(
            "calibserve_connections_refused", "Connections answered 503 at once: the process "
            "held max_connections open ones", registry=r,
        )
        self.connection_timeouts = Counter(
            "calibserve_connection_timeouts", "Connections closed by a deadline: header, body "
            "(408 where a request had begun), keep_alive (idle), write (a reader that stopped)",
            ["kind"], registry=r,
        )
        for kind in ("header", "body", "keep_alive", "write"):
            self.connection_timeouts.labels(kind)
        self._bins: dict[tuple[str, str, str], CalibrationAccumulator] = {}
        self._lock = threading.Lock()

    def init_model(self, model: str, methods: tuple[str, ...] = ("answer",)) -> None:
        """Create a model's series (per method) at zero so dashboards and rate() see them."""
        with self._lock:
            for method in methods:
                self._bins.setdefault((model, method, FEEDBACK),
                                      CalibrationAccumulator(n_bins=N_BINS))
        for method in methods:
            self.ece.labels(model, method).set(0.0)

    def init_source(self, model: str, methods: tuple[str, ...], source: str) -> None:
        """Create a model's per-bin counters for another `source` (probes) at zero."""
        with self._lock:
            for method in methods:
                self._bins.setdefault((model, method, source),
                                      CalibrationAccumulator(n_bins=N_BINS))

    def record_outcome(self, model: str, confidence: float, correct: bool, method: str,
                       source: str) -> None:
        """One labelled outcome into the per-bin counters of (model, method, source) only."""
        with self._lock:
            acc = self._bins.setdefault((model, method, source),
                                        CalibrationAccumulator(n_bins=N_BINS))
            acc.update(confidence, bool(correct))

    def record_feedback(self, model: str, confidence: float, correct: bool,
                        method: str = "answer") -> None:
        """One accepted feedback: per-bin counters and the ECE gauge of its method move
        together."""
        with self._lock:
            acc = self._bins.setdefault((model, method, FEEDBACK),
                                        CalibrationAccumulator(n_bins=N_BINS))
            acc.update(confidence, bool(correct))
            ece = float(acc.ece())
        self.ece.labels(model, method).set(ece)
        self.feedback.labels(model, "accepted").inc()

    def accumulator(self, model: str, method: str = "answer",
                    source: str = "feedback") -> CalibrationAccumulator:
        """A copy of a model's calibration statistics for one method and source here."""
        with self._lock:
            acc = self._bins.get((model, method, source))
            return acc.copy() if acc is not None else CalibrationAccumulator(n_bins=N_BINS)

    def _calibration_text(self) -> str:
        with self._lock:
            snapshot = {key: (acc.counts.tolist(), acc.conf_sum.tolist(),
                              acc.correct_sum.tolist())
                        for key, acc in sorted(self._bins.items())}
        families = (
            ("calibserve_calibration_samples_total",
             "Labelled samples (feedback or probe) per confidence bin", 0),
            ("calibserve_calibration_confidence_sum",
             "Summed calibrated confidence of labelled samples per bin", 1),
            ("calibserve_calibration_correct_total", "Labelled samples correct per bin", 2),
        )
        lines: list[str] = []
        for name, doc, idx in families:
            lines.append(f"# HELP {name} {doc}")
            lines.append(f"# TYPE {name} counter")
            for (model, method, source), values in snapshot.items():
                label, kind, src = _escape(model), _escape(method), _escape(source)
                for b, v in enumerate(values[idx]):
                    lines.append(f'{name}{{bin="{b}",method="{kind}",model="{label}",'
                                 f'source="{src}"}} {_number(v)}')
        return "\n".join(lines) + "\n"

    def render(self) -> bytes:
        """The registry's series (routing's too when built on it) and the per-bin counters."""
        return generate_latest(self.registry) + self._calibration_text().encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    v = float(value)
    return str(int(v)) + ".0" if v.is_integer() else repr(v)

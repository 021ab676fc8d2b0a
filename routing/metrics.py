"""Prometheus series of routing/ as one object, built on the registry it is given.

The server builds a `RoutingMetrics` on its own registry and hands it to the Router and the
Upstreams it creates, so one `/metrics` render shows routing's series with the server's. Code that
builds a Router or an Upstream by hand and passes none gets `default_metrics()`: one shared set on
prometheus_client's default registry, created on first use.

Names are those of docs/internals.md. Escalation rate per route is
`rate(calibserve_escalations_total[5m])` summed over reason and tier, divided by
`rate(calibserve_route_requests_total[5m])`. `calibserve_escalations_total` counts requests
answered by a stronger tier (label `tier` = the tier that answered), once each: on a route of
three tiers a request sent on by the primary and then by the middle tier counts once, as the
last tier's; a stronger tier that failed counts in `calibserve_escalation_errors_total` instead.
"""

from __future__ import annotations

from functools import cache

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge


class RoutingMetrics:
    """routing/'s counters and gauges, recorded through the methods below."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.route_requests = Counter(
            "calibserve_route_requests_total", "Requests routed, by route.", ["route"],
            registry=r,
        )
        self.escalations = Counter(
            "calibserve_escalations_total",
            "Requests answered by a stronger tier, by route, reason and answering tier (once "
            "each, however many tiers it passed).",
            ["route", "reason", "tier"], registry=r,
        )
        self.agreements = Counter(
            "calibserve_escalation_agreement_total",
            "Escalated requests where the primary's answer agreed with the stronger tier's.",
            ["route", "agreed"], registry=r,
        )
        self.escalation_errors = Counter(
            "calibserve_escalation_errors_total",
            "Stronger tiers that failed while escalating, by route and tier.",
            ["route", "tier"], registry=r,
        )
        self.confidence_requests = Counter(
            "calibserve_confidence_requests_total",
            "Extra upstream requests a confidence method made (verify, consistency), by route, "
            "method and outcome (ok|no_verdict|error|unsupported).",
            ["route", "method", "outcome"], registry=r,
        )
        self.upstream_retries = Counter(
            "calibserve_upstream_retries_total", "Retried upstream attempts.", ["upstream"],
            registry=r,
        )
        self.circuit_states = Gauge(
            "calibserve_circuit_state",
            "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open.",
            ["upstream"], registry=r,
        )
        self.circuit_opens = Counter(
            "calibserve_circuit_opens_total", "Times an upstream's circuit opened.", ["upstream"],
            registry=r,
        )

    def routed(self, route: str) -> None:
        self.route_requests.labels(route=route).inc()

    def escalated(self, route: str, reason: str, tier: str) -> None:
        self.escalations.labels(route=route, reason=reason, tier=tier).inc()

    def agreed(self, route: str, agreed: bool) -> None:
        self.agreements.labels(route=route, agreed=str(agreed).lower()).inc()

    def escalation_failed(self, route: str, tier: str) -> None:
        self.escalation_errors.labels(route=route, tier=tier).inc()

    def confidence_requested(self, route: str, method: str, outcome: str) -> None:
        self.confidence_requests.labels(route=route, method=method, outcome=outcome).inc()

    def retried(self, upstream: str) -> None:
        self.upstream_retries.labels(upstream=upstream).inc()

    def circuit_state(self, upstream: str, state: int) -> None:
        self.circuit_states.labels(upstream=upstream).set(state)

    def circuit_opened(self, upstream: str) -> None:
        self.circuit_opens.labels(upstream=upstream).inc()


@cache
def default_metrics() -> RoutingMetrics:
    """The shared set on the default registry, for Routers and Upstreams given none."""
    return RoutingMetrics(REGISTRY)

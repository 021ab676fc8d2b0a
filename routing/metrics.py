"""Prometheus metrics of routing/ (default registry), named as in docs/internals.md.

Escalation rate per route is `rate(calibserve_escalations_total[5m])` summed over reason and tier,
divided by `rate(calibserve_route_requests_total[5m])`. `calibserve_escalations_total` counts
requests answered by a stronger tier (label `tier` = the tier that answered); a stronger tier that
failed counts in `calibserve_escalation_errors_total` instead.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ROUTE_REQUESTS = Counter(
    "calibserve_route_requests_total", "Requests routed, by route.", ["route"]
)
ESCALATIONS = Counter(
    "calibserve_escalations_total",
    "Requests answered by a stronger tier, by route, reason and answering tier.",
    ["route", "reason", "tier"],
)
AGREEMENT = Counter(
    "calibserve_escalation_agreement_total",
    "Escalated requests where the primary's answer agreed with the stronger tier's.",
    ["route", "agreed"],
)
ESCALATION_ERRORS = Counter(
    "calibserve_escalation_errors_total",
    "Stronger tiers that failed while escalating, by route and tier.",
    ["route", "tier"],
)
UPSTREAM_RETRIES = Counter(
    "calibserve_upstream_retries_total", "Retried upstream attempts.", ["upstream"]
)
CIRCUIT_STATE = Gauge(
    "calibserve_circuit_state",
    "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open.",
    ["upstream"],
)
CIRCUIT_OPENS = Counter(
    "calibserve_circuit_opens_total", "Times an upstream's circuit opened.", ["upstream"]
)

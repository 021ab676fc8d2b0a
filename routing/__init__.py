"""calibserve routing: escalation policies and upstream resilience (no HTTP-framework code).

A Route is an ordered list of Tiers (primary first); the Router asks the primary, attaches each
choice's calibrated confidence, and lets the route's policy decide whether a stronger tier should
answer instead; on a route of 3+ tiers each middle tier's answer is judged by its own policy in
turn (escalation.py holds those rules for both the JSON and the streaming path).
Upstreams add timeouts, retries and a circuit breaker; anything with the `UpstreamClient` shape
can stand in for one. Metrics go to the `RoutingMetrics` a Router or Upstream is given.
See routing/README.md.
"""

from calibserve.routing.agreement import answers_agree, named_letter
from calibserve.routing.breaker import CircuitBreaker, CircuitState
from calibserve.routing.errors import (
    CircuitOpen,
    RoutingError,
    UpstreamBadResponse,
    UpstreamClientError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from calibserve.routing.identity import (
    api_root,
    choose_model,
    discover_model,
    model_card,
    probe_health,
    served_models,
    server_root,
)
from calibserve.routing.metrics import RoutingMetrics, default_metrics
from calibserve.routing.policy import BudgetPolicy, Decision, NeverPolicy, Policy, ThresholdPolicy
from calibserve.routing.replicas import ReplicaPool
from calibserve.routing.result import RoutedChunk, RoutedResult
from calibserve.routing.retry import RetryPolicy, parse_retry_after
from calibserve.routing.route import Route, Scorer, Tier
from calibserve.routing.router import Router
from calibserve.routing.stream_mode import StreamMode
from calibserve.routing.upstream import Upstream
from calibserve.routing.upstream_client import UpstreamClient

__all__ = [
    "BudgetPolicy",
    "CircuitBreaker",
    "CircuitOpen",
    "CircuitState",
    "Decision",
    "NeverPolicy",
    "Policy",
    "ReplicaPool",
    "RetryPolicy",
    "Route",
    "RoutedChunk",
    "RoutedResult",
    "Router",
    "RoutingError",
    "RoutingMetrics",
    "Scorer",
    "StreamMode",
    "ThresholdPolicy",
    "Tier",
    "Upstream",
    "UpstreamBadResponse",
    "UpstreamClient",
    "UpstreamClientError",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "answers_agree",
    "api_root",
    "choose_model",
    "default_metrics",
    "discover_model",
    "model_card",
    "named_letter",
    "parse_retry_after",
    "probe_health",
    "served_models",
    "server_root",
]

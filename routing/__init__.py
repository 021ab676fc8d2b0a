"""calibserve routing: escalation policies and upstream resilience (no HTTP-framework code).

A Route is an ordered list of Tiers (primary first); the Router asks the primary, attaches each
choice's calibrated confidence, and lets the route's policy decide whether a stronger tier should
answer instead. Upstreams add timeouts, retries and a circuit breaker. See routing/README.md.
"""

from calibserve.routing.agreement import answers_agree, option_letter
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
from calibserve.routing.policy import BudgetPolicy, Decision, NeverPolicy, Policy, ThresholdPolicy
from calibserve.routing.result import RoutedChunk, RoutedResult
from calibserve.routing.retry import RetryPolicy, parse_retry_after
from calibserve.routing.route import Route, Scorer, Tier
from calibserve.routing.router import Router
from calibserve.routing.streaming_mode import StreamMode
from calibserve.routing.upstream import Upstream

__all__ = [
    "BudgetPolicy",
    "CircuitBreaker",
    "CircuitOpen",
    "CircuitState",
    "Decision",
    "NeverPolicy",
    "Policy",
    "RetryPolicy",
    "Route",
    "RoutedChunk",
    "RoutedResult",
    "Router",
    "RoutingError",
    "Scorer",
    "StreamMode",
    "ThresholdPolicy",
    "Tier",
    "Upstream",
    "UpstreamBadResponse",
    "UpstreamClientError",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "answers_agree",
    "option_letter",
    "parse_retry_after",
]

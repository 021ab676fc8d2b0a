"""A per-upstream circuit breaker: stop calling an upstream that keeps failing.

closed --(failure_threshold consecutive failures)--> open --(reset_timeout)--> half-open
half-open lets exactly one probe through: success closes the circuit, failure re-opens it (and
restarts the cool-down). While open, calls fail fast, so a dead primary costs the client nothing
before the router falls back to the next tier. State changes go to the RoutingMetrics the
breaker was given, else to its upstream's (see `bind`), else to `default_metrics()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum

from calibserve.routing.metrics import RoutingMetrics, default_metrics


class CircuitState(IntEnum):
    """Values match the `calibserve_circuit_state` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Consecutive-failure breaker. Not thread-safe; meant for one asyncio event loop."""

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: RoutingMetrics | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.name = name
        self._clock = clock
        self._metrics = metrics
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self._publish()

    @property
    def state(self) -> CircuitState:
        # Open turns half-open lazily, when someone looks after the cool-down.
        if (
            self._state is CircuitState.OPEN
            and self._clock() - self._opened_at >= self.reset_timeout
        ):
            self._set(CircuitState.HALF_OPEN)
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """May a call go through now? In half-open, True for the single probe only."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._probe_in_flight = False
        if self._state is not CircuitState.CLOSED:
            self._set(CircuitState.CLOSED)

    def record_failure(self) -> None:
        self._probe_in_flight = False
        if self._state is CircuitState.HALF_OPEN:
            self._open()
            return
        self._failures += 1
        if self._state is CircuitState.CLOSED and self._failures >= self.failure_threshold:
            self._open()

    def release(self) -> None:
        """A call ended with neither verdict (e.g. cancelled): let another probe through."""
        self._probe_in_flight = False

    def bind(self, name: str, metrics: RoutingMetrics | None = None) -> None:
        """Name the breaker after its upstream (for metric labels) and record on the upstream's
        metrics, unless the breaker was given its own name or metrics."""
        changed = False
        if self._metrics is None and metrics is not None:
            self._metrics, changed = metrics, True
        if self.name is None:
            self.name, changed = name, True
        if changed:
            self._publish()

    @property
    def metrics(self) -> RoutingMetrics:
        return self._metrics if self._metrics is not None else default_metrics()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._set(CircuitState.OPEN)
        if self.name is not None:
            self.metrics.circuit_opened(self.name)

    def _set(self, state: CircuitState) -> None:
        self._state = state
        self._publish()

    def _publish(self) -> None:
        if self.name is not None:
            self.metrics.circuit_state(self.name, int(self._state))

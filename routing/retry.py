"""When and how long to wait before retrying a transient upstream failure.

Retried: connect errors (nothing reached the upstream, so a retry cannot duplicate work) and the
statuses in `retry_statuses` (429, 502, 503 by default). Read timeouts are not retried: the
upstream may still be generating, and a retry would double both latency and load.
Back-off is exponential with full jitter, so replicas that failed together do not retry together;
a Retry-After header sets a floor on the wait, and one longer than `max_retry_after` is not waited
for at all (the error goes back to the client, which can honour it itself).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


@dataclass
class RetryPolicy:
    """Retry settings for one upstream. `max_attempts` counts the first try."""

    max_attempts: int = 3
    base_delay: float = 0.1
    max_delay: float = 2.0
    max_retry_after: float = 10.0
    retry_statuses: frozenset[int] = frozenset({429, 502, 503})
    rng: Callable[[], float] = field(default=random.random, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must be >= 0")

    def should_retry_status(self, status: int) -> bool:
        return status in self.retry_statuses

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 1), or None: give up.

        None when the attempts are used up or Retry-After asks for longer than we will wait.
        """
        if attempt >= self.max_attempts:
            return None
        backoff = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1)) * self.rng()
        if retry_after is None:
            return backoff
        if retry_after > self.max_retry_after:
            return None
        # Honour the upstream's floor, plus a little jitter so synchronized clients spread out.
        return retry_after + self.base_delay * self.rng()


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())

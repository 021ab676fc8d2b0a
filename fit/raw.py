"""A reply's raw confidence by one method: served, or recomputed from its logprobs and checked.

The token statistics are recomputed with calibration's own `confidence_score` (the served raw,
when that method scored the reply, must agree with its recomputation); `verify` and
`consistency` cannot be recomputed: their raw is what the server's extra request returned.
"""

from __future__ import annotations

import math

from calibserve.calibration import confidence_method, confidence_score
from calibserve.fit.errors import ServeFitError
from calibserve.fit.passes import Reply

__all__ = [
    "RAW_TOLERANCE",
    "method_raw",
    "served_raw",
]

# Served and recomputed raw confidences must agree to float rounding.
RAW_TOLERANCE = 1e-9


def served_raw(reply: Reply, method: str) -> float | None:
    """The raw confidence the server served for `reply` when `method` scored it, else None."""
    if reply.confidence.get("method") != method:
        return None
    value = float(reply.confidence["raw"])
    return value if math.isfinite(value) else 0.0


def method_raw(reply: Reply, method: str, q: float) -> float:
    """`method`'s raw confidence of a reply. Token statistics: the served raw when the server
    scored it by that method (checked against the recomputation), else recomputed from the
    returned logprobs. `verify` / `consistency`: the served raw (`ServeFitError` when that
    method did not serve the reply: it cannot be recomputed)."""
    if confidence_method(method).needs_upstream:
        served_extra = served_raw(reply, method)
        if served_extra is None:
            raise ServeFitError(f"the reply was served by {reply.confidence.get('method')!r}, "
                                f"not {method!r}: its {method} confidence is unknown")
        return served_extra
    value = confidence_score(reply.logprobs or {"content": []}, method, q=q)
    value = 0.0 if not math.isfinite(value) else value
    if reply.confidence.get("method") == method:
        served = float(reply.confidence["raw"])
        if abs(served - value) > RAW_TOLERANCE:
            raise ServeFitError(
                f"served raw {method} confidence {served!r} differs from its recomputation "
                f"{value!r}: the fit would not be what is served"
            )
        return served
    return value

"""What the router hands back to the server: the answer plus how it was obtained."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoutedResult:
    """One routed request. For streams `body` is None and the fields fill in as it goes.

    - `served_by`: name of the tier whose answer the client gets.
    - `escalated`: a tier other than the primary answered (low confidence, budget, or fallback).
    - `reason`: `low_confidence|budget|primary_failed|uncalibrated` when escalation was tried,
      else None; on a route of 3+ tiers, the reason of the last hop tried (kept when that hop
      failed, so `reason` set with `escalation_error` means "wanted to").
    - `primary_confidence`: the primary's calibrated confidence the decision used (minimum over
      choices; in `prefix:N` streams the prefix confidence); None if the primary failed.
    - `confidence`: calibrated confidence of the served answer (minimum over choices).
    - `threshold`: the primary's policy's threshold at decision time (None for `never`).
    - `judgments`: every tier whose answer a policy judged, in order (the primary's, then each
      middle tier's on a route of 3+ tiers): `{"tier", "confidence", "threshold", "escalate"}`.
    - `escalation_error`: why the stronger tier(s) failed; the client got the answer of the last
      tier that answered (the primary's, or a middle tier's that its own policy sent on).
    - `primary_error`: why the primary failed when another tier answered instead.
    - `upstream_seconds`: time spent waiting on upstreams (total minus this = proxy overhead).
    - `agreement`: escalated and both answered: did the primary agree with the answer served?
    """

    route: str
    body: dict[str, Any] | None = None
    served_by: str = ""
    escalated: bool = False
    primary_confidence: float | None = None
    confidence: float | None = None
    threshold: float | None = None
    reason: str | None = None
    escalation_error: str | None = None
    primary_error: str | None = None
    tiers_tried: list[str] = field(default_factory=list)
    judgments: list[dict[str, Any]] = field(default_factory=list)
    upstream_seconds: float = 0.0
    agreement: bool | None = None

    def calibserve(self, **extra: Any) -> dict[str, Any]:
        """The `calibserve` object of a response (DESIGN.md), JSON-ready; `extra` keys (a
        stream's `confidence`, a Responses answer's `feedback_id`) follow the fixed ones."""
        return {
            "served_by": self.served_by,
            "escalated": self.escalated,
            "primary_confidence": self.primary_confidence,
            "threshold": self.threshold,
            "reason": self.reason,
            "escalation_error": self.escalation_error,
            "primary_error": self.primary_error,
            "tiers_tried": list(self.tiers_tried),
            "judgments": [dict(j) for j in self.judgments],
            "agreement": self.agreement,
        } | extra

    def headers(self, confidence: float | None = None) -> dict[str, str]:
        """The `x-calibserve-*` response headers: who served, whether escalated, and the
        confidence when known (a stream's headers go out before it is)."""
        headers = {
            "x-calibserve-served-by": self.served_by,
            "x-calibserve-escalated": "true" if self.escalated else "false",
        }
        if confidence is not None:
            headers["x-calibserve-confidence"] = f"{confidence:.6f}"
        return headers


@dataclass
class RoutedChunk:
    """One item of `Router.stream`: an SSE chunk to send, or (data None) the end of the stream.

    `result` is the same RoutedResult object on every item: `served_by` and `escalated` are final
    from the first chunk on (so the server can set headers then); confidence, agreement and
    timing are final on the last item, whose `data` is None and which must not be sent.
    """

    data: dict[str, Any] | None
    result: RoutedResult

    @property
    def final(self) -> bool:
        return self.data is None

"""Routes: an ordered list of tiers (primary first, then stronger models) and their policies.

The route's `policy` judges the primary's answer; a middle tier of a route of three or more
tiers is judged by its own `Tier.policy` (None: its answer is served as is); the last tier is
never judged (there is nothing stronger to ask). `Route.policy_for(index)` is the one rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from calibserve.routing.policy import NeverPolicy, Policy
from calibserve.routing.stream_mode import StreamMode
from calibserve.routing.upstream_client import UpstreamClient
from calibserve.routing.verify_tokens import VerifyTails


class ConfidenceLike(Protocol):
    """`calibration.Confidence` (read-only members, so frozen dataclasses match)."""

    @property
    def score(self) -> float: ...

    @property
    def raw(self) -> float: ...

    @property
    def method(self) -> str: ...


class StreamScorer(Protocol):
    def feed(self, delta_logprobs: Any) -> Any: ...

    def confidence(self) -> ConfidenceLike: ...


class Scorer(Protocol):
    """What routing needs from `calibration.Scorer`; `options_offered`: does the request's
    prompt offer lettered options (routing.payload.options_offered)."""

    def score_choice(self, choice_logprobs: Any, options_offered: bool | None = None
                     ) -> ConfidenceLike: ...

    def stream(self, options_offered: bool | None = None) -> StreamScorer: ...


def default_scorer() -> Scorer:
    """`mean` confidence, identity calibrator: what a model without calibration.json gets."""
    from calibserve.calibration import Scorer as CalibrationScorer

    scorer: Scorer = CalibrationScorer.from_config(None)
    return scorer


@dataclass
class Tier:
    """One model behind one upstream. `name` (default: `model`) is what `served_by` reports.

    `policy`: what judges this tier's answer when it is a middle tier (neither the primary,
    which the route's `policy` judges, nor the last); None: its answer is served as is.
    """

    model: str
    upstream: UpstreamClient
    scorer: Scorer | None = None
    name: str = ""
    policy: Policy | None = field(default=None, compare=False)
    # What verify's token-id prompts append after a reply, learned from this tier's engine.
    verify_tails: VerifyTails = field(default_factory=VerifyTails, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.model
        if self.scorer is None:
            self.scorer = default_scorer()

    @property
    def confidence_scorer(self) -> Scorer:
        assert self.scorer is not None  # set in __post_init__
        return self.scorer


@dataclass
class Route:
    """What a client's `model` name maps to. `stream_mode`: "buffer", "prefix:N" or "off"."""

    name: str
    tiers: list[Tier]
    policy: Policy = field(default_factory=NeverPolicy)
    stream_mode: str | StreamMode = "buffer"

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError(f"route {self.name!r} has no tiers")
        self.tiers = list(self.tiers)
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"route {self.name!r}: tier names must be unique, got {names}")
        self.stream_mode = StreamMode.parse(self.stream_mode)

    @property
    def mode(self) -> StreamMode:
        assert isinstance(self.stream_mode, StreamMode)
        return self.stream_mode

    @property
    def primary(self) -> Tier:
        return self.tiers[0]

    def policy_for(self, index: int) -> Policy | None:
        """What judges tier `index`'s answer: the route's `policy` for the primary, the tier's
        own for a middle tier; None (the answer is served as is) for the last tier, which has
        nothing stronger to ask, and where the policy is None or `never`."""
        if index >= len(self.tiers) - 1:
            return None
        policy = self.policy if index == 0 else self.tiers[index].policy
        return None if policy is None or isinstance(policy, NeverPolicy) else policy

    @property
    def can_escalate(self) -> bool:
        """Does any tier's answer get judged (else escalation is only ever a fallback)?"""
        return any(self.policy_for(i) is not None for i in range(len(self.tiers)))

"""`Scorer`: the served confidence, built from `calibration.json`, for batch and streamed replies.

One object turns a choice's logprobs into `Confidence(score, raw, method)`: the raw confidence
by the configured method (falling back, e.g. from `answer` to `mean`, for free-form replies),
then the fitted calibrator, clipped to [0, 1]. merge writes the config; server and routing read
it, so the confidence chosen offline is the one served.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from calibserve.calibration.calibrators import Calibrator, IdentityCalibrator, calibrator_from_dict
from calibserve.calibration.confidence import (
    DEFAULT_OPTIONS,
    METHODS,
    Confidence,
    StreamingConfidence,
)
from calibserve.calibration.errors import CalibrationError, NoOptionTokensError

__all__ = ["Scorer", "ScoredStream"]

SUPPORTED_VERSIONS = (1,)


@dataclass(slots=True)
class Scorer:
    """Raw-confidence method and options plus a calibrator; see `from_config`."""

    method: str = "mean"
    options: tuple[str, ...] = DEFAULT_OPTIONS
    temperature: float = 1.0
    fallback: str = "mean"
    q: float = 0.1
    calibrator: Calibrator = field(default_factory=IdentityCalibrator)
    thresholds: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.fallback not in METHODS or self.fallback == "answer":
            raise CalibrationError(
                f"fallback must be one of mean, min, first, quantile, got {self.fallback!r}"
            )
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise CalibrationError(f"temperature must be positive, got {self.temperature!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> Scorer:
        """Build from a parsed `calibration.json` (None: `mean` method, identity calibrator)."""
        if config is None:
            return cls()
        if not isinstance(config, Mapping):
            raise CalibrationError("calibration config must be a JSON object")
        version = config.get("version", 1)
        if version not in SUPPORTED_VERSIONS:
            raise CalibrationError(f"unsupported calibration.json version {version!r}")
        conf = config.get("confidence") or {}
        if not isinstance(conf, Mapping):
            raise CalibrationError("calibration.json 'confidence' must be an object")
        options: Sequence[str] = conf.get("options") or DEFAULT_OPTIONS
        cal = config.get("calibrator")
        try:
            return cls(
                method=str(conf.get("method", "mean")),
                options=tuple(str(o) for o in options),
                temperature=float(conf.get("temperature", 1.0)),
                fallback=str(conf.get("fallback", "mean")),
                q=float(conf.get("quantile", conf.get("q", 0.1))),
                calibrator=calibrator_from_dict(cal) if cal else IdentityCalibrator(),
                thresholds=[dict(t) for t in config.get("thresholds") or []],
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"malformed calibration config: {exc}") from exc

    def stream(self) -> ScoredStream:
        """An incremental scorer for a streamed reply (one per choice)."""
        return ScoredStream(self)

    def score_choice(self, choice_logprobs: Any) -> Confidence:
        """Confidence of one choice from its `logprobs` object (chat or completions) or floats."""
        s = self.stream()
        s.feed(choice_logprobs)
        return s.confidence()

    def calibrate(self, raw: float) -> float:
        """Apply the calibrator to a raw confidence and clip to [0, 1]."""
        value = float(self.calibrator.apply(raw))
        return min(1.0, max(0.0, value)) if value == value else 0.0


class ScoredStream:
    """`feed(delta_logprobs)` chunk by chunk; `confidence()` equals the batch result so far."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self._stream = StreamingConfidence(
            scorer.method, q=scorer.q, options=scorer.options, temperature=scorer.temperature
        )

    def feed(self, logprobs: Any) -> None:
        """Add a chunk's logprobs (chat delta `content` list/object or completions object)."""
        self._stream.feed(logprobs)

    @property
    def n_tokens(self) -> int:
        """Tokens seen so far."""
        return self._stream.n_tokens

    def confidence(self) -> Confidence:
        """Calibrated confidence of what has been fed so far."""
        method = self.scorer.method
        try:
            raw = self._stream.value(method)
        except NoOptionTokensError:
            method = self.scorer.fallback
            raw = self._stream.value(method)
        return Confidence(score=self.scorer.calibrate(raw), raw=raw, method=method)

    @property
    def score(self) -> float:
        """Calibrated score so far."""
        return self.confidence().score

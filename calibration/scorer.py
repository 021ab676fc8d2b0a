"""`Scorer`: the served confidence, built from the calibration document, for batch and streamed
replies.

One object turns a choice's logprobs into `Confidence(score, raw, method, calibrated)`. Which
method scores a reply depends on its prompt (`options_offered`: `mc_prompt.offers_options` of the
request; None when it cannot be read) and, for an option-letter multiple-choice method (`answer`),
on the reply's first token:

- a prompt that offers options: a reply starting with an option letter by the multiple-choice
  method, any other reply by `no_letter` (such replies are another kind of data than short
  answers, whose map the free-form method has);
- a prompt without options: the free-form method, whatever the first token;
- a prompt that cannot be read (token ids; a caller that does not say): a letter reply by the
  multiple-choice method, any other by the free-form method.

A multiple-choice method that reads no letters (a token statistic, as v1 documents may name)
scores every reply. Each method is served
through its own calibrator only: a method with none in the document gets the identity map and
`calibrated=False`, never another method's map. merge writes the document; server and routing
read it, so the confidence chosen offline is the one served.

A free-form method that needs extra upstream work (`verify`, `consistency`: see methods.py) cannot
be computed from the reply alone: the Scorer then scores the reply by the token statistic
`INTERIM` (`mean`, through `mean`'s own map) and says, through `extra_work(confidence)`, that
routing should do that work; `refined(raw)` is the confidence once it is done. When the work fails
the fallback is what is served, labelled `mean`, never with the other method's map.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from calibserve.calibration.calibrators import Calibrator, IdentityCalibrator
from calibserve.calibration.confidence import (
    DEFAULT_OPTIONS,
    Confidence,
    StreamingConfidence,
)
from calibserve.calibration.document import DEFAULT_QUANTILE, CalibrationDocument
from calibserve.calibration.errors import CalibrationError, NoOptionTokensError
from calibserve.calibration.methods import (
    CONFIDENCE_METHODS,
    DEFAULT_CONSISTENCY_K,
    FREE_FORM_METHODS,
    INTERIM,
    NO_LETTER,
    ConfidenceMethod,
    confidence_method,
)

__all__ = ["LABEL_FREE", "Scorer", "ScoredStream", "ServedMethod"]

# The `calibration` of a served confidence whose map was fitted without labels.
LABEL_FREE = "label-free"


@dataclass(frozen=True, slots=True)
class ServedMethod:
    """A confidence method as served: its name and its own calibrator (None: uncalibrated)."""

    name: str = "mean"
    calibrator: Calibrator | None = None
    # How the map was fitted, said in every reply it scores: "label-free" for a map fitted
    # without labels (`fit.labels` "none"); None for a labelled map or none.
    calibration: str | None = None

    def __post_init__(self) -> None:
        if self.name not in CONFIDENCE_METHODS:
            raise CalibrationError(
                f"unknown method {self.name!r}; valid: {', '.join(CONFIDENCE_METHODS)}"
            )

    @property
    def kind(self) -> ConfidenceMethod:
        """The method's registry entry (what it reads, what extra work it needs)."""
        return confidence_method(self.name)

    @property
    def calibrated(self) -> bool:
        return self.calibrator is not None

    @property
    def map(self) -> Calibrator:
        """The map applied to the raw confidence: the method's own, else the identity."""
        return self.calibrator if self.calibrator is not None else IdentityCalibrator()

    def score(self, raw: float) -> float:
        """The map applied to `raw`, clipped to [0, 1] (NaN: 0)."""
        value = float(self.map.apply(raw))
        return min(1.0, max(0.0, value)) if value == value else 0.0

    @classmethod
    def from_document(cls, doc: CalibrationDocument, name: str) -> ServedMethod:
        entry = doc.method(name)
        served = entry.calibration_map()
        return cls(name, served, LABEL_FREE if served is not None and entry.label_free else None)

    @classmethod
    def optional(cls, doc: CalibrationDocument, name: str) -> ServedMethod:
        """`name` with its own map when the document has an entry for it, else uncalibrated."""
        return cls.from_document(doc, name) if name in doc.methods else cls(name)

    def confidence(self, raw: float) -> Confidence:
        """`raw` served by this method: through its own map, labelled with its name."""
        return Confidence(self.score(raw), raw, self.name, self.calibrated,
                          self.calibration if self.calibrated else None)


@dataclass(frozen=True, slots=True)
class Scorer:
    """The multiple-choice and free-form methods with their maps; see `from_document`."""

    multiple_choice: ServedMethod = field(default_factory=ServedMethod)
    free_form: ServedMethod = field(default_factory=ServedMethod)
    # Replies to an option prompt the option-letter method finds no letter in.
    no_letter: ServedMethod = field(default_factory=lambda: ServedMethod(NO_LETTER))
    options: tuple[str, ...] = DEFAULT_OPTIONS
    temperature: float = 1.0
    q: float = DEFAULT_QUANTILE
    # What a free-form method needing extra work is served as until (or unless) it is done.
    interim_method: ServedMethod = field(default_factory=ServedMethod)
    verify_question: str | None = None
    # The tokenizer's yes/no ids (from the fit): the verdict asks for exactly their logprobs.
    verdict_token_ids: tuple[int, ...] = ()
    consistency_k: int = DEFAULT_CONSISTENCY_K

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise CalibrationError(f"temperature must be positive, got {self.temperature!r}")
        if self.free_form.name not in FREE_FORM_METHODS:
            raise CalibrationError(
                f"the free-form method must be one of {', '.join(FREE_FORM_METHODS)}, "
                f"got {self.free_form.name!r}"
            )
        if self.no_letter.name != NO_LETTER:
            raise CalibrationError(f"the no-letter method must be {NO_LETTER!r}, "
                                   f"got {self.no_letter.name!r}")

    @classmethod
    def from_document(cls, doc: CalibrationDocument | None) -> Scorer:
        """Build from the typed document (None: `mean` method, identity map, uncalibrated)."""
        if doc is None:
            return cls()
        return cls(
            multiple_choice=ServedMethod.from_document(doc, doc.multiple_choice),
            free_form=ServedMethod.from_document(doc, doc.free_form),
            no_letter=ServedMethod.optional(doc, NO_LETTER),
            options=doc.options(),
            temperature=doc.temperature(),
            q=doc.quantile(),
            interim_method=ServedMethod.optional(doc, INTERIM),
            verify_question=doc.verify_question(),
            verdict_token_ids=doc.verdict_token_ids(),
            consistency_k=doc.consistency_k(),
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | CalibrationDocument | None) -> Scorer:
        """Build from a parsed `calibration.json` of any supported version (or None)."""
        if config is None or isinstance(config, CalibrationDocument):
            return cls.from_document(config)
        return cls.from_document(CalibrationDocument.from_dict(config))

    @property
    def method(self) -> str:
        """The multiple-choice method (tried first on every reply)."""
        return self.multiple_choice.name

    @property
    def free_form_method(self) -> str:
        """The free-form method (replies the multiple-choice method finds no option letter in)."""
        return self.free_form.name

    @property
    def calibrator(self) -> Calibrator:
        """The multiple-choice method's map (the identity when it has none)."""
        return self.multiple_choice.map

    @property
    def extra(self) -> ServedMethod | None:
        """The free-form method when it needs extra upstream work (verify, consistency)."""
        return self.free_form if self.free_form.kind.needs_upstream else None

    def extra_work(self, confidence: Any) -> ConfidenceMethod | None:
        """What extra upstream work would replace `confidence` (a reply's confidence from
        `score_choice` / `stream().confidence()`); None: it is final (option-letter replies, or a
        free-form method that reads the reply's own logprobs)."""
        extra = self.extra
        if extra is None or getattr(confidence, "method", None) != self.interim_method.name:
            return None
        if self.interim_method.name == self.multiple_choice.name:
            return None  # scored by the multiple-choice method: not a free-form reply
        return extra.kind

    def refined(self, raw: float) -> Confidence:
        """The confidence once the extra work produced `raw` (through its method's own map)."""
        extra = self.extra
        if extra is None:
            raise CalibrationError(f"method {self.free_form.name!r} needs no extra work")
        return extra.confidence(raw)

    def stream(self, options_offered: bool | None = None) -> ScoredStream:
        """An incremental scorer for a streamed reply (one per choice); `options_offered`: does
        its prompt offer lettered options (`mc_prompt.offers_options`; None: unknown; module
        docstring)."""
        return ScoredStream(self, options_offered)

    def score_choice(self, choice_logprobs: Any, options_offered: bool | None = None
                     ) -> Confidence:
        """Confidence of one choice from its `logprobs` object (chat or completions) or floats."""
        s = self.stream(options_offered)
        s.feed(choice_logprobs)
        return s.confidence()

    def calibrate(self, raw: float) -> float:
        """The multiple-choice method's map applied to a raw confidence, clipped to [0, 1]."""
        return self.multiple_choice.score(raw)


class ScoredStream:
    """`feed(delta_logprobs)` chunk by chunk; `confidence()` equals the batch result so far."""

    def __init__(self, scorer: Scorer, options_offered: bool | None = None) -> None:
        self.scorer = scorer
        self.options_offered = options_offered
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
        """Confidence of what has been fed so far, through the scoring method's own map."""
        scorer = self.scorer
        offered = self.options_offered
        if offered is not False or not scorer.multiple_choice.kind.option_letters:
            served = scorer.multiple_choice
            try:
                return served.confidence(self._stream.value(served.name))
            except NoOptionTokensError:
                if offered:
                    served = scorer.no_letter
                    return served.confidence(self._stream.value(served.name))
        served = scorer.free_form
        if served.kind.needs_upstream:
            served = scorer.interim_method  # until routing has done the extra work
        return served.confidence(self._stream.value(served.name))

    @property
    def score(self) -> float:
        """Score so far."""
        return self.confidence().score

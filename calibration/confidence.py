"""Raw confidence scores of one reply from its token logprobs, batch and streamed.

Inputs are any shape `calibration.logprobs.token_logprobs` accepts (OpenAI chat or completions
logprobs, plain floats, None). `null` logprobs are skipped (they carry no evidence); vLLM's
-9999 floor is probability 0.

Raw methods (`confidence_score`): `mean` = geometric-mean token probability, `min` = least likely
token, `first` = first (non-null) token, `quantile` = the `q`-quantile (default 0.1) of token
probabilities (a low quantile is robust to length), `answer` = probability of the chosen option
among the option tokens (see `answer_confidence`), `no_letter` = the `mean` statistic again (the
method a reply to an option prompt that names no letter is served by: same number, own map, see
methods.py). A reply with no usable token scores 0.0.

`StreamingConfidence` keeps the running statistics of every method, so it can be fed chunk by
chunk and read at any time; the batch functions are that same object fed once, so the two agree
exactly (bit for bit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibserve.calibration.errors import CalibrationError, NoOptionTokensError
from calibserve.calibration.logprobs import (
    TokenLogprobs,
    clean_logprob,
    parse_logprobs,
    token_logprobs,
)

__all__ = [
    "METHODS",
    "Confidence",
    "TokenLogprobs",
    "token_logprobs",
    "normalize_token",
    "answer_confidence",
    "confidence_score",
    "StreamingConfidence",
    "confidence_json",
]

METHODS: tuple[str, ...] = ("mean", "min", "first", "quantile", "answer", "no_letter")
DEFAULT_OPTIONS: tuple[str, ...] = ("A", "B", "C", "D")
_TOKEN_PREFIXES = ("\u2581", "\u0120")  # SentencePiece "▁" and GPT-2 byte-level BPE "Ġ"


@dataclass(frozen=True, slots=True)
class Confidence:
    """A served confidence: `score` (in [0, 1]), `raw`, the `method` used, and whether `score`
    went through that method's own calibrator (`calibrated`; False: `score` is `raw`, clipped)."""

    score: float
    raw: float
    method: str
    calibrated: bool = False
    # How the map was fitted, when a client should know: "label-free" (no labels: DACA against
    # a reference model, calibration/label_free.py). None: fitted on labelled data (or no map).
    calibration: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape attached to each choice (`confidence_json`)."""
        return confidence_json(self)


def confidence_json(conf: Any) -> dict[str, Any]:
    """The one builder of a choice's `confidence`: `{"score", "raw", "method", "calibrated"}`,
    and `"calibration"` ("label-free") only where the confidence says how its map was fitted.
    `conf` is a `Confidence` or anything with its fields (a scorer that does not say whether it
    calibrated is `calibrated: false`)."""
    out: dict[str, Any] = {"score": float(conf.score), "raw": float(conf.raw),
                           "method": str(conf.method),
                           "calibrated": bool(getattr(conf, "calibrated", False))}
    how = getattr(conf, "calibration", None)
    if how is not None:
        out["calibration"] = str(how)
    return out


def normalize_token(token: str) -> str:
    """Token text as an option label: whitespace and a leading "▁"/"Ġ" removed."""
    t = token.strip()
    while t.startswith(_TOKEN_PREFIXES):
        t = t[1:].strip()
    return t


def answer_confidence(
    top: Mapping[str, float | None],
    chosen: str | None,
    options: Sequence[str] = DEFAULT_OPTIONS,
    temperature: float = 1.0,
) -> float:
    """Probability of the chosen option, renormalised over the option tokens present in `top`.

    `top` maps token text to logprob (the first generated token's alternatives). Token texts are
    normalised (`normalize_token`) before matching; several tokens naming one option add up.
    Logprobs are divided by `temperature` before renormalising (softmax(z / T) over options);
    options missing from `top` get probability 0. `chosen=None` picks the most likely option.
    Raises `NoOptionTokensError` when no option has positive probability in `top`, or when
    `chosen` is not an option (a free-form reply): callers fall back to another method.
    """
    t = float(temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise CalibrationError(f"temperature must be positive and finite, got {temperature!r}")
    labels = [normalize_token(o) for o in options]
    if not labels:
        raise CalibrationError("answer confidence needs at least one option")
    scaled: dict[str, list[float]] = {}
    wanted = set(labels)
    for tok, lp in top.items():
        if lp is None:
            continue
        label = normalize_token(tok)
        v = clean_logprob(lp)
        if label in wanted and v == v:
            scaled.setdefault(label, []).append(v / t)
    present = {k: v for k, v in scaled.items() if max(v) > -math.inf}
    if not present:
        raise NoOptionTokensError(f"none of the options {labels} is among the top logprobs")
    # logsumexp per option, then a stable softmax across options.
    per_option = {k: float(np.logaddexp.reduce(np.asarray(v))) for k, v in present.items()}
    peak = max(per_option.values())
    mass = {k: math.exp(v - peak) for k, v in per_option.items()}
    total = sum(mass.values())
    if chosen is None:
        # Ties go to the earlier option, the same rule as numpy's argmax over option logits.
        label = max((lab for lab in labels if lab in mass), key=lambda lab: mass[lab])
    else:
        label = normalize_token(chosen)
        if label not in wanted:
            raise NoOptionTokensError(f"chosen token {chosen!r} is not one of the options {labels}")
    return mass.get(label, 0.0) / total


class StreamingConfidence:
    """Incremental confidence: `feed` logprob chunks, read `score` (or `value(method)`) any time.

    Running statistics of every method are kept (sum and count of logprobs, minimum, first
    token and its alternatives, all token probabilities for `quantile`), so reading is O(1)
    except for `quantile`. Feeding the whole reply once gives the batch result exactly.
    """

    def __init__(
        self,
        method: str = "mean",
        *,
        q: float = 0.1,
        options: Sequence[str] = DEFAULT_OPTIONS,
        temperature: float = 1.0,
    ) -> None:
        if method not in METHODS:
            raise CalibrationError(
                f"unknown method {method!r}; valid methods: {', '.join(METHODS)}"
            )
        if not 0.0 <= q <= 1.0:
            raise CalibrationError(f"quantile q must be in [0, 1], got {q!r}")
        self.method = method
        self.q = float(q)
        self.options = tuple(options)
        self.temperature = float(temperature)
        self.n_tokens = 0  # every token seen, null or not
        self._count = 0  # tokens with a usable logprob
        self._sum = 0.0
        self._min = 0.0
        self._first: float | None = None
        self._first_token: str | None = None
        self._first_top: dict[str, float] | None = None
        self._probs: list[float] = []

    def feed(self, logprobs: Any) -> None:
        """Add a chunk: a chat delta's logprobs (object or content list), completions logprobs,
        or plain floats. `None`/empty chunks are ignored."""
        parsed = parse_logprobs(logprobs, 1 if self._first_token is None else 0)
        if self._first_token is None and len(parsed):
            self._first_token = parsed.tokens[0]
            top = dict(parsed.top[0])
            lp0 = float(parsed.logprobs[0])
            # The sampled token is not always among its own top_logprobs; it is evidence too.
            if lp0 == lp0 and parsed.tokens[0] and parsed.tokens[0] not in top:
                top[parsed.tokens[0]] = lp0
            self._first_top = top
        self.n_tokens += len(parsed)
        # Sequential float adds, in order, so that chunked and one-shot feeding agree exactly.
        for v in parsed.logprobs.tolist():
            if v != v:
                continue
            if self._count == 0:
                self._first = v
                self._min = v
            elif v < self._min:
                self._min = v
            self._count += 1
            self._sum += v
            self._probs.append(math.exp(v))

    @property
    def score(self) -> float:
        """Raw confidence of the configured method (may raise `NoOptionTokensError`)."""
        return self.value(self.method)

    def value(self, method: str) -> float:
        """Raw confidence by any method from the same running statistics."""
        if method == "answer":
            if self._first_top is None:
                raise NoOptionTokensError("no token yet: no option to score")
            return answer_confidence(
                self._first_top, self._first_token or None, self.options, self.temperature
            )
        if method not in METHODS:
            raise CalibrationError(
                f"unknown method {method!r}; valid methods: {', '.join(METHODS)}"
            )
        if self._count == 0:
            return 0.0
        if method in ("mean", "no_letter"):
            return math.exp(self._sum / self._count)
        if method == "min":
            return math.exp(self._min)
        if method == "first":
            return math.exp(self._first if self._first is not None else -math.inf)
        return float(np.quantile(np.asarray(self._probs), self.q))


def confidence_score(
    logprobs: TokenLogprobs | Sequence[float] | Any,
    method: str = "mean",
    *,
    q: float = 0.1,
    options: Sequence[str] = DEFAULT_OPTIONS,
    temperature: float = 1.0,
) -> float:
    """Raw confidence of one reply by `method` (see the module docstring for the methods)."""
    stream = StreamingConfidence(method, q=q, options=options, temperature=temperature)
    stream.feed(logprobs)
    return stream.score

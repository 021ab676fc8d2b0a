"""Parsing the token logprobs an OpenAI-compatible server returns into one shape.

Accepted shapes (`token_logprobs`):
- a chat choice's `logprobs` object: `{"content": [{"token", "logprob", "bytes", "top_logprobs":
  [{"token", "logprob"}, ...]}, ...]}`, or just its `content` list (what a stream chunk carries);
- a completions choice's `logprobs` object: `{"tokens", "token_logprobs", "top_logprobs":
  [{token: logprob}, ...] | None, "text_offset"}`;
- a plain sequence (or array) of floats; `None` or empty for an empty reply.

`null` logprobs become NaN (scorers skip them: they carry no evidence); values <= -9999 (vLLM's
floor for "probability underflowed") become -inf (probability 0); tiny positive values from
rounding become 0. Anything else raises `CalibrationError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from calibserve.calibration.errors import CalibrationError

__all__ = ["LOGPROB_FLOOR", "TokenLogprobs", "clean_logprob", "token_logprobs", "parse_logprobs"]

# vLLM reports -9999.0 for a probability that underflowed; anything at or below means "zero".
LOGPROB_FLOOR = -9999.0


@dataclass(slots=True)
class TokenLogprobs:
    """Tokens of one reply, their logprobs (NaN = null, -inf = floor) and top alternatives."""

    tokens: list[str] = field(default_factory=list)
    logprobs: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0, np.float64))
    top: list[dict[str, float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def clean_logprob(value: Any) -> float:
    """Normalise one logprob: None/NaN -> NaN (skipped), <= floor -> -inf, > 0 -> 0."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise CalibrationError(f"logprob must be a number or null, got {value!r}") from exc
    if v != v:
        return math.nan
    if v <= LOGPROB_FLOOR:
        return -math.inf
    return v if v < 0.0 else 0.0


def _add_top(top: dict[str, float], token: Any, value: Any) -> None:
    lp = clean_logprob(value)
    if lp != lp or not isinstance(token, str):
        return
    # Distinct byte sequences can decode to the same string: their probabilities add up.
    prev = top.get(token)
    top[token] = lp if prev is None else float(np.logaddexp(prev, lp))


def _chat_top(entries: Any) -> dict[str, float]:
    top: dict[str, float] = {}
    if isinstance(entries, Iterable) and not isinstance(entries, str | bytes | Mapping):
        for alt in entries:
            if isinstance(alt, Mapping):
                _add_top(top, alt.get("token"), alt.get("logprob"))
    return top


def _from_chat_content(content: Sequence[Any], top_tokens: int | None) -> TokenLogprobs:
    tokens: list[str] = []
    lps: list[float] = []
    tops: list[dict[str, float]] = []
    for i, entry in enumerate(content):
        # `type(...) is` first: the engine's JSON is plain dicts, str and float, and this loop
        # runs for every token of every reply (ABC isinstance checks were its largest cost).
        if type(entry) is not dict and not isinstance(entry, Mapping):
            raise CalibrationError(f"chat logprobs content entries must be objects, got {entry!r}")
        tok = entry.get("token")
        tokens.append(tok if type(tok) is str or isinstance(tok, str) else "")
        value = entry.get("logprob")
        # An ordinary logprob is its own clean value (clean_logprob's common case).
        lps.append(value if type(value) is float and LOGPROB_FLOOR < value < 0.0
                   else clean_logprob(value))
        wanted = top_tokens is None or i < top_tokens
        tops.append(_chat_top(entry.get("top_logprobs")) if wanted else {})
    return TokenLogprobs(tokens, np.asarray(lps, dtype=np.float64), tops)


def _from_completions(obj: Mapping[str, Any], top_tokens: int | None) -> TokenLogprobs:
    raw_lps = obj.get("token_logprobs") or []
    lps = [v if type(v) is float and LOGPROB_FLOOR < v < 0.0 else clean_logprob(v)
           for v in raw_lps]  # the common case first, as in _from_chat_content
    raw_tokens = obj.get("tokens") or []
    tokens = [t if isinstance(t, str) else "" for t in raw_tokens]
    tokens = (tokens + [""] * len(lps))[: len(lps)]
    raw_top = obj.get("top_logprobs") or []
    tops: list[dict[str, float]] = []
    for i in range(len(lps)):
        alts = raw_top[i] if i < len(raw_top) and (top_tokens is None or i < top_tokens) else None
        top: dict[str, float] = {}
        if isinstance(alts, Mapping):
            for tok, lp in alts.items():
                _add_top(top, tok, lp)
        tops.append(top)
    return TokenLogprobs(tokens, np.asarray(lps, dtype=np.float64), tops)


def token_logprobs(logprobs: Any) -> TokenLogprobs:
    """Parse any accepted logprobs shape (see the module docstring) into `TokenLogprobs`."""
    return parse_logprobs(logprobs, None)


def parse_logprobs(logprobs: Any, top_tokens: int | None) -> TokenLogprobs:
    """`token_logprobs`, parsing alternatives only for the first `top_tokens` tokens (None: all).

    Only the first token's alternatives matter for scoring; skipping the rest makes scoring a
    long reply several times cheaper.
    """
    if logprobs is None:
        return TokenLogprobs()
    if isinstance(logprobs, TokenLogprobs):
        return logprobs
    if isinstance(logprobs, Mapping):
        if "content" in logprobs:
            return _from_chat_content(logprobs.get("content") or [], top_tokens)
        if "token_logprobs" in logprobs or "tokens" in logprobs:
            return _from_completions(logprobs, top_tokens)
        if not logprobs:
            return TokenLogprobs()
        raise CalibrationError(
            "unrecognised logprobs object: expected chat 'content' or completions 'token_logprobs'"
        )
    if isinstance(logprobs, np.ndarray):
        logprobs = logprobs.reshape(-1).tolist()
    if isinstance(logprobs, Sequence) and not isinstance(logprobs, str | bytes):
        if any(isinstance(v, Mapping) for v in logprobs):
            return _from_chat_content(logprobs, top_tokens)
        lps = [clean_logprob(v) for v in logprobs]
        return TokenLogprobs([""] * len(lps), np.asarray(lps, np.float64), [{} for _ in lps])
    raise CalibrationError(f"unsupported logprobs type {type(logprobs).__name__}")

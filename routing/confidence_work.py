"""The extra upstream work a free-form confidence method needs, done for one tier's reply.

When a tier's Scorer serves a free-form method that reads more than the reply's own logprobs
(calibration/methods.py), the reply is first scored by the token-statistic fallback (`mean`),
then `ConfidenceWork.refine` asks the SAME tier's upstream for what the method reads:

- `verify`: one prompt-only request per choice (concurrently for n > 1): the conversation with
  the reply as the assistant's turn and the yes/no question (`calibration.verify_messages`; for
  completions `verify_prompt`), `max_tokens: 1`, temperature 0, and the verdict token's logprobs:
  when the calibration document names the tokenizer's yes/no token ids (the fit records them),
  exactly those (vLLM's `logprob_token_ids`: both sides are always read, never a one-sided or
  missing verdict because a spelling fell out of a top-k), else the top 20. Confidence:
  `verify_confidence` (P(yes) renormalised over yes/no). When the main request returned its
  token ids (asked for when verify may score the reply: `payload.verify_reads_ids`), the verify
  prompt goes as ids instead, one `/v1/completions` request: the reply's prompt ids, its own
  ids and the tail the engine's template adds after them (verify_tokens.py), so the engine
  neither renders the template nor tokenises the conversation again.
  The verify prompt is the reply's prompt plus the reply plus the question, so a reply that ran
  to (or near) the engine's context length leaves no room for the question: vLLM refuses the
  verify request with a 400 (`param: input_tokens`). Then the request is sent once more with the
  reply's tail cut (`fit_reply`): at least as many of its tokens as the question and the chat
  template's turn markers can take, so, since the reply's own request fitted, the verify prompt
  fits; a verdict on the reply's beginning instead of none. No extra cost on the happy path.
- `consistency`: one request per client request (shared by its choices) with `n: k` samples of
  the same prompt at temperature 1 with no top-p / top-k / min-p truncation, whatever the
  client's own sampling (a greedy client's samples would all equal its reply: agreement 1 says
  nothing), no logprobs; so the map fitted on these samples applies to every client. Confidence:
  the fraction of samples agreeing with the reply after `normalize_answer`.

These requests go straight to the tier's upstream: they are not routed, never escalate, never
count as user requests, and the client never sees them. Each is counted once in
`calibserve_confidence_requests_total{route,method,outcome}` (outcome `ok`, `no_verdict`,
`error`, `unsupported`) and its time is upstream time. When the work fails (an upstream error,
no yes/no among the verdict's alternatives, a request shape it cannot rephrase, e.g. a
tokenised completions prompt) the fallback confidence is served, labelled `mean`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from calibserve.calibration import (
    VERIFY_QUESTION,
    VERIFY_SUFFIX,
    CalibrationError,
    NoVerdictError,
    consistency_confidence,
    token_logprobs,
    verify_confidence,
    verify_messages,
    verify_prompt,
)
from calibserve.calibration import Scorer as CalibrationScorer
from calibserve.routing.agreement import choice_text
from calibserve.routing.errors import UpstreamClientError, UpstreamError
from calibserve.routing.metrics import RoutingMetrics
from calibserve.routing.payload import endpoint_path, options_offered
from calibserve.routing.result import RoutedResult
from calibserve.routing.route import ConfidenceLike, Tier
from calibserve.routing.verify_tokens import ReplyIds

VERIFY_TOP_LOGPROBS = 20
# Sampling keys that would change what a consistency sample or a verdict is.
_DROP = ("stream", "stream_options", "logprobs", "top_logprobs", "best_of", "echo", "n",
         "suffix", "prompt_logprobs", "temperature", "top_p", "top_k", "min_p")
# Consistency samples the model's own distribution (see the module docstring).
SAMPLE_TEMPERATURE = 1.0
# Tokens a chat template adds around the reply's turn and the question's (the assistant's end
# marker, the user turn's header and end, the next assistant header): ChatML takes 10, Llama 3
# 15; `fit_reply` reserves this many beside the question's own tokens.
TEMPLATE_TOKENS = 32
# vLLM's `param` on a prompt longer than the context (renderers/params.py).
_OVERFLOW_PARAMS = ("input_tokens", "input_text")


class _Unsupported(Exception):
    """The request cannot be rephrased for this method (counted as `unsupported`)."""


def context_overflow(exc: UpstreamClientError) -> bool:
    """Did the engine refuse the request because its prompt exceeds the context length?"""
    if exc.status_code != 400:
        return False
    body = exc.body
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("param") in _OVERFLOW_PARAMS:
        return True
    return "maximum context length" in str(exc)


def fit_reply(pieces: Sequence[str], question: str) -> str | None:
    """The reply (its tokens as the engine returned them, or its streamed pieces, each at least
    one token) without the last pieces the verify question needs room for: at least the
    question's UTF-8 bytes (no byte-level token is shorter than a byte) plus `TEMPLATE_TOKENS`
    plus the verdict token. None when nothing of the reply would be left."""
    kept = [p for p in pieces if p]
    keep = len(kept) - (len(question.encode("utf-8")) + TEMPLATE_TOKENS + 1)
    return "".join(kept[:keep]) if keep > 0 else None


class ConfidenceWork:
    """The extra work one tier's reply to one request may need; `refine` each choice."""

    def __init__(self, tier: Tier, endpoint: str, body: dict[str, Any], result: RoutedResult,
                 metrics: RoutingMetrics) -> None:
        scorer = tier.confidence_scorer
        self.scorer = scorer if isinstance(scorer, CalibrationScorer) else None
        self.tier = tier
        self.endpoint = endpoint
        self.body = body
        self.result = result
        self.metrics = metrics
        # Does the prompt offer lettered options (which method scores the reply: scorer.py)?
        self.options_offered = options_offered(endpoint, body, scorer)
        self._samples: asyncio.Task[list[str] | None] | None = None

    def pending(self, confidence: ConfidenceLike) -> bool:
        """Will `refine` replace this confidence (does it need extra upstream work)?"""
        return self.scorer is not None and self.scorer.extra_work(confidence) is not None

    async def refine(self, confidence: ConfidenceLike, text: str,
                     pieces: Sequence[str] = (), ids: ReplyIds | None = None
                     ) -> ConfidenceLike:
        """The choice's confidence after its method's extra work; `confidence` when none is
        needed or the work failed (the fallback, as labelled). `pieces`: the reply's tokens (or
        streamed pieces) joining to `text`, for `fit_reply`; empty: never cut. `ids`: the
        reply's prompt and tokens (verify_tokens.py); None: verify sends its prompt as text."""
        if self.scorer is None:
            return confidence
        kind = self.scorer.extra_work(confidence)
        if kind is None:
            return confidence
        if kind.extra == "verify":
            raw = await self._verify(text, pieces, ids)
        else:
            raw = await self._consistency(text)
        return confidence if raw is None else self.scorer.refined(raw)

    async def refine_all(
        self, items: Sequence[tuple[ConfidenceLike, str, Sequence[str]]],
        ids: Sequence[ReplyIds | None] = (),
    ) -> list[ConfidenceLike]:
        """`refine` every (confidence, text, pieces), concurrently; `ids` by position."""
        if not any(self.pending(conf) for conf, _, _ in items):
            return [conf for conf, _, _ in items]
        known = list(ids) + [None] * (len(items) - len(ids))
        return list(await asyncio.gather(*(self.refine(c, t, p, i)
                                           for (c, t, p), i in zip(items, known, strict=True))))

    # -- verify ---------------------------------------------------------------------------
    def _verify_body(self, reply: str) -> dict[str, Any]:
        assert self.scorer is not None
        question = self.scorer.verify_question
        out: dict[str, Any] = {"model": self.tier.model, "max_tokens": 1, "temperature": 0,
                               "stream": False}
        if self.endpoint == "chat":
            messages = self.body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _Unsupported
            out["messages"] = (verify_messages(messages, reply) if question is None
                               else verify_messages(messages, reply, question))
            out["logprobs"] = True
            out["top_logprobs"] = VERIFY_TOP_LOGPROBS
            if self.scorer.verdict_token_ids:
                out["top_logprobs"] = 1  # the verdict ids replace vLLM's top-k
                out["logprob_token_ids"] = list(self.scorer.verdict_token_ids)
        else:
            prompt = self.body.get("prompt")
            if not isinstance(prompt, str):
                raise _Unsupported  # token ids or a batch of prompts: not rephrasable
            out["prompt"] = (verify_prompt(prompt, reply) if question is None
                             else verify_prompt(prompt, reply, f"\n{question}\nAnswer:"))
            out["logprobs"] = VERIFY_TOP_LOGPROBS
            if self.scorer.verdict_token_ids:
                out["logprobs"] = 1
                out["logprob_token_ids"] = list(self.scorer.verdict_token_ids)
        return out

    async def _verify_ids_body(self, ids: ReplyIds | None) -> dict[str, Any] | None:
        """The verify request on token ids (verify_tokens.py), or None: send it as text."""
        if ids is None:
            return None
        tail = await self.tier.verify_tails.tail(self.tier.upstream, self.tier.model,
                                                 self.endpoint, self._verify_question())
        if tail is None:
            return None
        assert self.scorer is not None
        out: dict[str, Any] = {"model": self.tier.model, "max_tokens": 1, "temperature": 0,
                               "stream": False, "prompt": [*ids.prompt, *ids.reply, *tail],
                               "logprobs": VERIFY_TOP_LOGPROBS}
        if self.scorer.verdict_token_ids:
            out["logprobs"] = 1
            out["logprob_token_ids"] = list(self.scorer.verdict_token_ids)
        return out

    def _verify_question(self) -> str:
        """What the verify prompt adds after the reply (the question, or completions' suffix)."""
        assert self.scorer is not None
        question = self.scorer.verify_question
        if self.endpoint == "chat":
            return VERIFY_QUESTION if question is None else question
        return VERIFY_SUFFIX if question is None else f"\n{question}\nAnswer:"

    async def _verify(self, reply: str, pieces: Sequence[str] = (),
                      ids: ReplyIds | None = None) -> float | None:
        try:
            try:
                by_ids = await self._verify_ids_body(ids)
                if by_ids is not None:
                    answer = await self._request(by_ids, "completions")
                else:
                    answer = await self._request(self._verify_body(reply))
            except UpstreamClientError as exc:
                # The reply filled the context: no room for the question (module docstring).
                shorter = fit_reply(pieces, self._verify_question())
                if shorter is None or not context_overflow(exc):
                    raise
                answer = await self._request(self._verify_body(shorter))
            choice = (answer.get("choices") or [{}])[0]
            parsed = token_logprobs(choice.get("logprobs"))
            if not len(parsed):
                raise NoVerdictError("the verdict has no token")
            top = dict(parsed.top[0])
            top.setdefault(parsed.tokens[0], float(parsed.logprobs[0]))
            raw = verify_confidence(top)
        except _Unsupported:
            self._count("verify", "unsupported")
            return None
        except NoVerdictError:
            self._count("verify", "no_verdict")
            return None
        except (UpstreamError, CalibrationError, LookupError, TypeError, AttributeError):
            self._count("verify", "error")
            return None
        self._count("verify", "ok")
        return raw

    # -- consistency ----------------------------------------------------------------------
    async def _consistency(self, reply: str) -> float | None:
        if self._samples is None:
            self._samples = asyncio.ensure_future(self._sample())
        samples = await self._samples
        if not samples:
            return None
        return consistency_confidence(reply, samples)

    async def _sample(self) -> list[str] | None:
        assert self.scorer is not None
        out = {k: v for k, v in self.body.items() if k not in _DROP}
        out["model"] = self.tier.model
        out["n"] = self.scorer.consistency_k
        out["temperature"] = SAMPLE_TEMPERATURE
        out["stream"] = False
        try:
            answer = await self._request(out)
            samples = [choice_text(c) for c in answer.get("choices") or []]
        except (UpstreamError, LookupError, TypeError, AttributeError):
            self._count("consistency", "error")
            return None
        self._count("consistency", "ok" if samples else "error")
        return samples

    # -- shared ---------------------------------------------------------------------------
    async def _request(self, payload: dict[str, Any], endpoint: str | None = None
                       ) -> dict[str, Any]:
        started = time.perf_counter()
        path = endpoint_path(endpoint or self.endpoint)
        try:
            return await self.tier.upstream.request_json(path, payload)
        finally:
            self.result.upstream_seconds += time.perf_counter() - started

    def _count(self, method: str, outcome: str) -> None:
        self.metrics.confidence_requested(self.result.route, method, outcome)

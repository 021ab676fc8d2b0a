"""`POST /v1/responses`: the Responses API, passed through with calibserve's confidence added.

The request goes to the primary tier's engine with its output logprobs forced on (the confidence
reads them; routing.client_view.responses_body) and comes back as the engine sent it, apart from:
`confidence` (the tier's scorer over every `output_text` part's logprobs, as for a chat choice)
and `calibserve` (with `feedback_id`, the signed id to send to /v1/feedback) on the response object,
the `x-calibserve-*` headers, and logprobs cut back to what the client asked for (none unless its
`include` has `message.output_text.logprobs`, then its `top_logprobs` alternatives). The response's
own `id` is the engine's: `previous_response_id` and `GET /v1/responses/{id}` need it.

Scoring is the chat path's one scoring step (routing.scoring.score_answer): the output's logprobs
scored by the primary tier's scorer, then, for a free-form method that needs it (verify,
consistency), the extra requests of routing/confidence_work.py on the same engine, asked as the
chat request that asks what the Responses body asks (routing.payload.responses_chat). Each
request is counted in `calibserve_requests_total{endpoint="responses"}` and timed like chat's.

Responses are scored, not escalated: they are served by the primary tier. The Responses API is
stateful (a response's id, its stored state and every `previous_response_id` chain live in the
engine that produced it): an answer from another tier could be neither retrieved nor continued
through the primary, and its stream's events are not the chat chunks the streaming escalation
core reads.

Streams are the engine's events, `event:` lines and all; the terminal event's `response`
(`response.completed`, `.incomplete` or `.failed`) carries `confidence` and `calibserve`.
Errors from the engine pass through unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from calibserve.calibration.confidence import confidence_json
from calibserve.routing import RoutedResult
from calibserve.routing.client_view import ResponsesView, responses_body
from calibserve.routing.confidence_work import ConfidenceWork
from calibserve.routing.payload import (
    options_offered,
    responses_chat,
    tier_top_logprobs,
)
from calibserve.routing.route import ConfidenceLike
from calibserve.routing.scoring import score_answer
from calibserve.server.engine_watch import ClientDisconnected
from calibserve.server.errors import APIError, error_body
from calibserve.server.outcomes import Outcome, outcome_of
from calibserve.server.passthrough import Forwarder
from calibserve.server.proxy import (
    ERROR_SOURCE,
    EventStream,
    reject_non_json_numbers,
    unknown_model,
)
from calibserve.server.runtime import ModelRuntime, ServerRuntime

log = logging.getLogger("calibserve.server")
PATH = "/v1/responses"
_TERMINAL = {"response.completed", "response.incomplete", "response.failed"}
_JSON = {"content-type": "application/json"}


def output_logprobs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Every output_text token of a response object, in order (chat's `content` entries' shape)."""
    out: list[dict[str, Any]] = []
    for item in obj.get("output") or []:
        for part in (item.get("content") or []) if isinstance(item, dict) else []:
            if isinstance(part, dict) and part.get("type") == "output_text":
                out.extend(e for e in part.get("logprobs") or [] if isinstance(e, dict))
    return out


class ResponsesProxy:
    """Serves /v1/responses through a model's primary tier."""

    def __init__(self, runtime: ServerRuntime, forwarder: Forwarder) -> None:
        self.rt = runtime
        self.forwarder = forwarder

    def _model(self, name: Any) -> ModelRuntime:
        model = self.forwarder.model_for(name)
        if model is None:
            raise unknown_model(name, self.rt.models)
        return model

    async def handle(self, request: Request, body: dict[str, Any]) -> Response:
        started = time.perf_counter()
        reject_non_json_numbers(body)
        model = self._model(body.get("model"))
        outcome = outcome_of(request)
        run = _Run(model, body, started)
        scorer = model.primary.tier.confidence_scorer
        top = tier_top_logprobs(scorer, options_offered("chat", run.chat, scorer))
        payload = responses_body(body, model.primary.upstream_model, top)
        content = json.dumps(payload).encode()
        asked = time.perf_counter()
        try:
            upstream = await self.forwarder.open(request, model, "POST", PATH, content, _JSON)
            if upstream.status_code == 200 and body.get("stream"):
                return EventStream(self._events(outcome, run, upstream),
                                   media_type="text/event-stream",
                                   headers=run.result.headers())
            data = await self.forwarder.read(model, upstream)
        except APIError as exc:  # no answer from the engine: calibserve's own 5xx
            self._failed(outcome, model, exc.reason or "")
            return exc.response()
        except ClientDisconnected:
            outcome.record(model.name, "client_error")
            return Response(status_code=499)
        finally:
            run.upstream_s += time.perf_counter() - asked
        if upstream.status_code != 200:  # the engine's error, as it sent it
            if upstream.status_code < 500:
                outcome.record(model.name, "client_error")
            else:
                self._failed(outcome, model, "upstream_status")
            return Response(data, status_code=upstream.status_code,
                            media_type=upstream.headers.get("content-type"),
                            headers={ERROR_SOURCE: "engine"})
        try:
            obj = json.loads(data)
        except ValueError:
            self._failed(outcome, model, "upstream_protocol")
            return APIError(502, "the engine's answer is not JSON",
                            code="upstream_protocol").response()
        headers = await self._finish(run, obj)
        self._observe(run)
        outcome.record(model.name, "ok")
        return JSONResponse(obj, headers=headers)

    def _failed(self, outcome: Outcome, model: ModelRuntime, reason: str) -> None:
        outcome.record(model.name, "upstream_error")
        kind = reason.removeprefix("upstream_") or "status"
        self.rt.metrics.upstream_errors.labels(model.primary.tier.name, kind).inc()

    def _observe(self, run: _Run) -> None:
        total = time.perf_counter() - run.started
        name = run.model.name
        self.rt.metrics.duration.labels(name, "responses").observe(total)
        self.rt.metrics.overhead.labels(name, "responses").observe(max(0.0, total - run.upstream_s))

    async def _score(self, run: _Run, obj: dict[str, Any]) -> ConfidenceLike:
        """The response's confidence through the one scoring step, with its method's extra
        work (verify, consistency) asked of the same engine as chat."""
        tier = run.model.primary.tier
        content = [
            part.get("text") or "" for item in obj.get("output") or [] if isinstance(item, dict)
            for part in item.get("content") or []
            if isinstance(part, dict) and part.get("type") == "output_text"]
        answer = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                       "content": "".join(content)},
                               "logprobs": {"content": output_logprobs(obj)}}]}
        work = ConfidenceWork(tier, "chat", run.chat, run.result, self.rt.routing_metrics)
        before = run.result.upstream_seconds
        (conf,) = await score_answer(answer, work)
        run.upstream_s += run.result.upstream_seconds - before
        return conf

    async def _finish(self, run: _Run, obj: dict[str, Any]) -> dict[str, str]:
        """Score a response object, add calibserve's fields, cut logprobs; the headers."""
        model = run.model
        conf = confidence_json(await self._score(run, obj))
        run.view.response(obj)
        if "model" in obj:
            obj["model"] = model.name
        obj["confidence"] = conf
        tier = model.primary.tier.name
        feedback_id = self.rt.signer.issue(
            "chatcmpl-", model.calibration_label(tier), [conf["score"]], [conf["raw"]],
            methods=[conf["method"]])
        run.result.primary_confidence = run.result.confidence = conf["score"]
        obj["calibserve"] = run.result.calibserve(feedback_id=feedback_id)
        self.rt.metrics.confidence.labels(model.name, conf["method"]).observe(conf["score"])
        return run.result.headers(conf["score"])

    async def _events(self, outcome: Outcome, run: _Run,
                      upstream: httpx.Response) -> AsyncIterator[str]:
        model = run.model
        name: str | None = None
        data: list[str] = []
        kind = "ok"
        lines = upstream.aiter_lines()
        timeout = model.primary.settings.timeout_s
        try:
            while True:
                waited = time.perf_counter()
                try:
                    async with asyncio.timeout(timeout):  # a stalled engine ends the stream
                        line = await anext(lines)
                except StopAsyncIteration:
                    break
                finally:
                    run.upstream_s += time.perf_counter() - waited
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                elif not line and data:
                    yield await self._event(run, name, "\n".join(data))
                    name, data = None, []
            if data:
                yield await self._event(run, name, "\n".join(data))
            self._observe(run)
        except (asyncio.CancelledError, GeneratorExit):
            kind = "client_error"  # the client went away mid-stream
            raise
        except (httpx.HTTPError, TimeoutError) as exc:
            kind = "upstream_error"
            log.warning("responses stream from %s broke off: %r", model.name, exc)
            self.rt.metrics.upstream_errors.labels(
                model.primary.tier.name,
                "timeout" if isinstance(exc, TimeoutError) else "protocol").inc()
            body = error_body(f"the engine for `{model.name}` broke off the stream",
                              "BadGatewayError", None, 502)
            yield f"event: error\ndata: {json.dumps(body)}\n\n"
        finally:
            await upstream.aclose()
            outcome.record(model.name, kind)

    async def _event(self, run: _Run, name: str | None, payload: str) -> str:
        head = f"event: {name}\n" if name else ""
        try:
            event = json.loads(payload)
        except ValueError:
            return f"{head}data: {payload}\n\n"  # `[DONE]` or the like: as it came
        if isinstance(event, dict):
            response = event.get("response")
            if event.get("type") in _TERMINAL and isinstance(response, dict):
                await self._finish(run, response)
            else:
                run.view.event(event)
                if isinstance(response, dict) and "model" in response:
                    response["model"] = run.model.name
        text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        return f"{head}data: {text}\n\n"


class _Run:
    """One Responses request: its model, what the client asked to see, its timing, and the
    chat request its confidence work asks."""

    __slots__ = ("model", "view", "chat", "result", "started", "upstream_s")

    def __init__(self, model: ModelRuntime, body: dict[str, Any], started: float) -> None:
        self.model = model
        self.view = ResponsesView(body)
        self.chat = responses_chat(body)
        tier = model.primary.tier.name
        self.result = RoutedResult(route=model.name, served_by=tier, tiers_tried=[tier])
        self.started = started
        self.upstream_s = 0.0

"""Serving one chat/completions request: route it, shape what the client sees, record metrics.

Once the model is known the proxy answers every outcome itself (errors included) and records it
on the request's Outcome (outcomes.py counts it).

What the client gets is the upstream's answer with three changes: each choice carries
`confidence`, the response carries `calibserve` and a signed `id`, and logprobs appear only if the
client asked for them (then as the upstream sent them, cut to the `top_logprobs` it asked for:
the router asks for the alternatives the confidence methods read, 5 for the `answer` method;
routing/client_view.py holds the rewrite and its inverse).

Streams: every chunk passes through as it comes; the chunk with a choice's `finish_reason` carries
its `confidence`; the last chunk before `[DONE]` (the usage chunk when the client asked for usage,
else an added chunk with no choices) carries the signed `id` to use for feedback and `calibserve`.
Earlier chunks keep the upstream's id, because the confidence the signed id carries is only known
at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from calibserve.routing import RoutedChunk, UpstreamError
from calibserve.routing.client_view import ClientView
from calibserve.server.engine import ManagedEngine
from calibserve.server.engine_watch import (
    ClientDisconnected,
    engine_died,
    engine_stopped,
    guard,
)
from calibserve.server.errors import APIError, error_body
from calibserve.server.outcomes import Outcome, outcome_of
from calibserve.server.runtime import ModelRuntime, ServerRuntime

log = logging.getLogger("calibserve.server")
T = TypeVar("T")
PREFIX = {"chat": "chatcmpl-", "completions": "cmpl-"}


def reject_non_json_numbers(value: Any, path: str = "") -> None:
    """400 for NaN or Infinity anywhere in the body.

    Python's json accepts them on the way in, but they are not JSON: forwarding them would fail
    (a 500) or hand the upstream something it cannot parse.
    """
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        raise APIError(400, f"{path or 'body'}: NaN and Infinity are not valid JSON numbers",
                       param=path or None, code="invalid_value")
    if isinstance(value, dict):
        for key, item in value.items():
            reject_non_json_numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            reject_non_json_numbers(item, f"{path}[{index}]")


def unknown_model(name: object, models: Iterable[str]) -> APIError:
    """404 for a body naming a model calibserve does not serve, as vLLM words it."""
    return APIError(404, f"The model `{name}` does not exist. Valid aliases: "
                    f"{', '.join(models)}.", param="model", code="model_not_found")


ERROR_SOURCE = "x-calibserve-error-source"  # `engine` on an error the engine answered itself


def engine_answer(exc: UpstreamError, status: int) -> Response:
    """The upstream's own error answer (4xx or 5xx), status and body unchanged (vLLM's errors
    stay vLLM's), with its Retry-After; marked so a client can tell it from calibserve's own."""
    headers = {**(_retry_after(exc) or {}), ERROR_SOURCE: "engine"}
    if isinstance(exc.body, dict | list):
        return JSONResponse(exc.body, status_code=status, headers=headers)
    return Response(str(exc.body or ""), status_code=status, headers=headers,
                    media_type="text/plain; charset=utf-8")


def _retry_after(exc: UpstreamError) -> dict[str, str] | None:
    if exc.retry_after is None:
        return None
    return {"Retry-After": str(max(1, round(exc.retry_after)))}


def _engine_stopped(model: ModelRuntime) -> APIError:
    return engine_stopped(model.name)


class EventStream(StreamingResponse):
    """SSE response that always closes its generator when the response ends.

    With ASGI 2.4 servers Starlette learns of a disconnect from a failed send and just stops
    iterating; closing the generator here (rather than whenever it is garbage collected) is what
    cancels the upstream generation at once.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sole_engine(model: ModelRuntime) -> ManagedEngine | None:
    """The managed engine whose death ends a request: a lone primary's (an escalation tier
    answers for a dead one otherwise)."""
    return model.primary.engine if len(model.tiers) == 1 else None


class Proxy:
    """Request handling for /v1/chat/completions and /v1/completions."""

    def __init__(self, runtime: ServerRuntime) -> None:
        self.rt = runtime
        self.metrics = runtime.metrics

    def lookup(self, name: str) -> ModelRuntime:
        model = self.rt.models.get(name)
        if model is None:
            raise unknown_model(name, self.rt.models)
        return model

    async def handle(self, request: Request, endpoint: str, body: dict[str, Any]) -> Response:
        started = time.perf_counter()
        model = self.lookup(body["model"])
        reject_non_json_numbers(body)
        n = body.get("n") or 1
        if n > self.rt.settings.max_n:
            raise APIError(400, f"n must be at most {self.rt.settings.max_n}", param="n",
                           code="invalid_value")
        outcome = outcome_of(request)
        if model.fast_fail:
            outcome.record(model.name, "upstream_error")
            return APIError(503, f"the engine for `{model.name}` is not running (restarting)",
                            code="engine_unavailable", headers={"Retry-After": "1"}).response()
        view = ClientView(endpoint, body)
        if body.get("stream"):
            return await self._stream(request, outcome, model, endpoint, body, view, started)
        return await self._complete(request, outcome, model, endpoint, body, view, started)

    # -- shared ---------------------------------------------------------------------------
    def _upstream_failure(self, outcome: Outcome, model: str, exc: UpstreamError) -> Response:
        """No tier could answer. An error the engine answered itself (4xx or 5xx) passes
        through as it came; a failure with no answer is calibserve's own 502/503/504."""
        status = exc.answered
        if status is not None and status < 500:
            outcome.record(model, "client_error")
            return engine_answer(exc, status)
        outcome.record(model, "upstream_error")
        self.metrics.upstream_errors.labels(exc.upstream or model, exc.kind).inc()
        if status is not None:
            return engine_answer(exc, status)
        return APIError(exc.status_code, str(exc), code="upstream_" + exc.kind,
                        headers=_retry_after(exc)).response()

    async def _engine_died(self, model: ModelRuntime, exc: UpstreamError) -> bool:
        return await engine_died(_sole_engine(model), exc)

    def _engine_down(self, outcome: Outcome, model: ModelRuntime) -> Response:
        """The managed engine died under the request: 503, retry in a moment."""
        outcome.record(model.name, "upstream_error")
        return _engine_stopped(model).response()

    async def _guard(self, aw: Awaitable[T], request: Request, model: ModelRuntime) -> T:
        return await guard(aw, request, _sole_engine(model), model.name)

    def _finish_choices(self, model: ModelRuntime, choices: list[dict[str, Any]]
                        ) -> tuple[list[float], list[float], list[str]]:
        scores: list[float] = []
        raws: list[float] = []
        methods: list[str] = []
        for choice in choices:
            conf = choice["confidence"]  # the router scored every choice (routing.scoring)
            scores.append(float(conf["score"]))
            raws.append(float(conf["raw"]))
            methods.append(str(conf["method"]))
            self.metrics.confidence.labels(model.name, methods[-1]).observe(scores[-1])
        return scores, raws, methods

    def _observe(self, model: str, endpoint: str, started: float, upstream_s: float) -> None:
        total = time.perf_counter() - started
        self.metrics.duration.labels(model, endpoint).observe(total)
        self.metrics.overhead.labels(model, endpoint).observe(max(0.0, total - upstream_s))

    # -- non-streaming --------------------------------------------------------------------
    async def _complete(self, request: Request, outcome: Outcome, model: ModelRuntime,
                        endpoint: str, body: dict[str, Any], view: ClientView,
                        started: float) -> Response:
        try:
            result = await self._guard(self.rt.router.complete(model.route, endpoint, body),
                                       request, model)
        except UpstreamError as exc:
            if await self._engine_died(model, exc):
                return self._engine_down(outcome, model)
            return self._upstream_failure(outcome, model.name, exc)
        except ClientDisconnected:
            outcome.record(model.name, "client_error")
            return Response(status_code=499)
        except APIError:  # _guard: the engine died while we waited
            return self._engine_down(outcome, model)
        answer = result.body or {}
        choices = answer.get("choices") or []
        scores, raws, methods = self._finish_choices(model, choices)
        view.answer(answer)
        answer["id"] = self.rt.signer.issue(
            PREFIX[endpoint], model.calibration_label(result.served_by), scores, raws,
            methods=methods,
        )
        answer["model"] = model.name
        answer["calibserve"] = result.calibserve()
        self._observe(model.name, endpoint, started, result.upstream_seconds)
        headers = result.headers(scores[0] if scores else None)
        response = JSONResponse(answer, headers=headers)
        outcome.record(model.name, "ok")
        return response

    # -- streaming ------------------------------------------------------------------------
    async def _stream(self, request: Request, outcome: Outcome, model: ModelRuntime,
                      endpoint: str, body: dict[str, Any], view: ClientView,
                      started: float) -> Response:
        items = self.rt.router.stream(model.route, endpoint, body)
        try:
            # Read the first item before answering: failures to start become proper HTTP errors,
            # and served_by/escalated are final by then (headers).
            first = await self._guard(anext(items), request, model)
        except UpstreamError as exc:
            await items.aclose()
            if await self._engine_died(model, exc):
                return self._engine_down(outcome, model)
            return self._upstream_failure(outcome, model.name, exc)
        except ClientDisconnected:
            await items.aclose()
            outcome.record(model.name, "client_error")
            return Response(status_code=499)
        except APIError:  # _guard: the engine died before the first chunk
            await items.aclose()
            return self._engine_down(outcome, model)
        except BaseException:
            await items.aclose()
            raise
        return EventStream(
            self._events(outcome, model, endpoint, items, first, view, started),
            media_type="text/event-stream",
            headers=first.result.headers(),
        )

    async def _events(self, outcome: Outcome, model: ModelRuntime, endpoint: str,
                      items: AsyncGenerator[RoutedChunk, None], first: RoutedChunk,
                      view: ClientView,
                      started: float) -> AsyncIterator[str]:
        scores: dict[int, float] = {}
        raws: dict[int, float] = {}
        methods: dict[int, str] = {}
        held: dict[str, Any] | None = None  # the usage chunk, sent last with the summary
        last: dict[str, Any] = {}
        kind = "ok"
        item = first
        try:
            while item.data is not None:
                chunk = item.data
                choices = chunk.get("choices")
                view.chunk(chunk)
                if not choices and "usage" in chunk:
                    held = chunk
                else:
                    for choice in choices or []:
                        conf = choice.get("confidence")
                        if isinstance(conf, dict):
                            idx = int(choice.get("index", 0))
                            scores[idx], raws[idx] = float(conf["score"]), float(conf["raw"])
                            methods[idx] = str(conf["method"])
                            self.metrics.confidence.labels(
                                model.name, methods[idx]).observe(conf["score"])
                    last = chunk
                    yield f"data: {_dumps(chunk)}\n\n"
                item = await anext(items)
            result = item.result
            summary = {"id": ""} | (held if held is not None else {
                "object": last.get("object", "chat.completion.chunk" if endpoint == "chat"
                                   else "text_completion"),
                "created": last.get("created", int(time.time())),
                "model": model.name,
                "choices": [],
            })
            order = sorted(scores)
            summary["id"] = self.rt.signer.issue(
                PREFIX[endpoint], model.calibration_label(result.served_by),
                [scores[i] for i in order] or [0.0],
                [raws[i] for i in order] or [0.0],
                methods=[methods[i] for i in order] or None,
            )
            summary["model"] = model.name
            summary["calibserve"] = result.calibserve(confidence=result.confidence)
            yield f"data: {_dumps(summary)}\n\n"
            self._observe(model.name, endpoint, started, result.upstream_seconds)
        except (asyncio.CancelledError, GeneratorExit):
            kind = "client_error"  # the client went away mid-stream
            raise
        except UpstreamError as exc:
            kind = "upstream_error"
            self.metrics.upstream_errors.labels(exc.upstream or model.name, exc.kind).inc()
            # vLLM's way to fail an open stream: an error event, then [DONE]. The engine's
            # own error event passes as it came.
            event = exc.body if isinstance(exc.body, dict) and "error" in exc.body else \
                error_body(str(exc), "BadGatewayError", None, 502)
            yield f"data: {_dumps(event)}\n\n"
        except Exception as exc:  # noqa: BLE001 - a stream cannot change its status any more
            kind = "server_error"
            log.exception("error while streaming: %s", exc)
            body = error_body("internal server error", "InternalServerError", None, 500)
            yield f"data: {_dumps(body)}\n\n"
        finally:
            await items.aclose()  # on client disconnect too: cancels the upstream generation
            outcome.record(model.name, kind)
        yield "data: [DONE]\n\n"

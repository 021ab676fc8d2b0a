"""`POST /v1/responses`: the Responses API, passed through with calibserve's confidence added.

The request goes to the primary tier's engine with its output logprobs forced on (the confidence
reads them; routing.payload.responses_body) and comes back as the engine sent it, apart from:
`confidence` (the tier's scorer over every `output_text` part's logprobs, as for a chat choice)
and `calibserve` (with `feedback_id`, the signed id to send to /v1/feedback) on the response object,
the `x-calibserve-*` headers, and logprobs cut back to what the client asked for (none unless its
`include` has `message.output_text.logprobs`, then its `top_logprobs` alternatives). The response's
own `id` is the engine's: `previous_response_id` and `GET /v1/responses/{id}` need it. Responses are
scored, not escalated: they are served by the primary tier.

Streams are the engine's events, `event:` lines and all; the terminal event's `response`
(`response.completed`, `.incomplete` or `.failed`) carries `confidence` and `calibserve`.
Errors from the engine pass through unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from calibserve.routing.payload import OUTPUT_LOGPROBS, responses_body
from calibserve.server.errors import APIError, error_body
from calibserve.server.passthrough import Forwarder
from calibserve.server.proxy import EventStream, reject_non_json_numbers
from calibserve.server.runtime import ModelRuntime, ServerRuntime

log = logging.getLogger("calibserve.server")
PATH = "/v1/responses"
_TERMINAL = {"response.completed", "response.incomplete", "response.failed"}
_JSON = {"content-type": "application/json"}


class ResponsesView:
    """What the client asked to see of the output logprobs calibserve always requests."""

    __slots__ = ("want", "top", "echoed")

    def __init__(self, body: dict[str, Any]) -> None:
        include = body.get("include")
        self.want = isinstance(include, list) and OUTPUT_LOGPROBS in include
        self.top = int(body.get("top_logprobs") or 0)
        # The response echoes the logprobs its sampling used: the client's, or none.
        self.echoed: int | None = body.get("top_logprobs", 0) if self.want else None

    def entries(self, entries: Any, empty: list[Any] | None) -> Any:
        """A logprobs list as the client asked: `empty` (None or []) when it did not."""
        if not isinstance(entries, list):
            return entries
        if not self.want:
            return empty
        for entry in entries:
            top = entry.get("top_logprobs") if isinstance(entry, dict) else None
            if isinstance(top, list) and len(top) > self.top:
                entry["top_logprobs"] = top[: self.top]  # vLLM keeps the first k too
        return entries

    def response(self, obj: dict[str, Any]) -> None:
        """A response object: every output_text part's logprobs, and the echoed top_logprobs."""
        if "top_logprobs" in obj:
            obj["top_logprobs"] = self.echoed
        for item in obj.get("output") or []:
            self.item(item)

    def item(self, item: Any) -> None:
        if isinstance(item, dict):
            for part in item.get("content") or []:
                self.part(part)

    def part(self, part: Any) -> None:
        if isinstance(part, dict) and part.get("type") == "output_text" and "logprobs" in part:
            # A finished part says null when logprobs were not asked for; an empty one [].
            empty: list[Any] | None = [] if part.get("logprobs") == [] else None
            part["logprobs"] = self.entries(part["logprobs"], empty)

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if "response" in event and isinstance(event["response"], dict):
            self.response(event["response"])
        if isinstance(event.get("item"), dict):
            self.item(event["item"])
        if isinstance(event.get("part"), dict):
            self.part(event["part"])
        if kind in ("response.output_text.delta", "response.output_text.done") and \
                "logprobs" in event:
            event["logprobs"] = self.entries(event["logprobs"], [])


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
            raise APIError(404, f"The model `{name}` does not exist. Valid aliases: "
                           f"{', '.join(self.rt.models)}.", param="model", code="model_not_found")
        return model

    async def handle(self, request: Request, body: dict[str, Any]) -> Response:
        reject_non_json_numbers(body)
        model = self._model(body.get("model"))
        view = ResponsesView(body)
        payload = responses_body(body, model.primary.upstream_model)
        content = json.dumps(payload).encode()
        upstream = await self.forwarder.open(model, "POST", PATH, content, _JSON)
        if upstream.status_code != 200 or not body.get("stream"):
            data = await self.forwarder.read(model, upstream)
            if upstream.status_code != 200:  # the engine's error, as it sent it
                return Response(data, status_code=upstream.status_code,
                                media_type=upstream.headers.get("content-type"))
            try:
                obj = json.loads(data)
            except ValueError as exc:
                raise APIError(502, "the engine's answer is not JSON",
                               code="upstream_protocol") from exc
            headers = self._finish(model, obj, view)
            return JSONResponse(obj, headers=headers)
        return EventStream(self._events(model, upstream, view), media_type="text/event-stream",
                           headers=self._headers(model, None))

    def _finish(self, model: ModelRuntime, obj: dict[str, Any],
                view: ResponsesView) -> dict[str, str]:
        """Score a response object, add calibserve's fields, cut logprobs; the headers."""
        scored = model.primary.scorer.score_choice({"content": output_logprobs(obj)})
        conf = scored.to_dict()
        view.response(obj)
        if "model" in obj:
            obj["model"] = model.name
        obj["confidence"] = conf
        tier = model.primary.tier.name
        feedback_id = self.rt.signer.issue(
            "chatcmpl-", model.calibration_label(tier), [scored.score], [scored.raw],
            methods=[scored.method])
        obj["calibserve"] = {"served_by": tier, "escalated": False, "primary_confidence":
                             scored.score, "threshold": None, "reason": None,
                             "escalation_error": None, "primary_error": None,
                             "tiers_tried": [tier], "agreement": None,
                             "feedback_id": feedback_id}
        self.rt.metrics.confidence.labels(model.name, scored.method).observe(scored.score)
        return self._headers(model, scored.score)

    @staticmethod
    def _headers(model: ModelRuntime, score: float | None) -> dict[str, str]:
        headers = {"x-calibserve-served-by": model.primary.tier.name,
                   "x-calibserve-escalated": "false"}
        if score is not None:
            headers["x-calibserve-confidence"] = f"{score:.6f}"
        return headers

    async def _events(self, model: ModelRuntime, upstream: httpx.Response,
                      view: ResponsesView) -> AsyncIterator[str]:
        name: str | None = None
        data: list[str] = []
        try:
            async for line in upstream.aiter_lines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                elif not line and data:
                    yield self._event(model, name, "\n".join(data), view)
                    name, data = None, []
            if data:
                yield self._event(model, name, "\n".join(data), view)
        except httpx.HTTPError as exc:
            log.warning("responses stream from %s broke off: %r", model.name, exc)
            body = error_body(f"the engine for `{model.name}` broke off the stream",
                              "BadGatewayError", None, 502)
            yield f"event: error\ndata: {json.dumps(body)}\n\n"
        finally:
            await upstream.aclose()

    def _event(self, model: ModelRuntime, name: str | None, payload: str,
               view: ResponsesView) -> str:
        head = f"event: {name}\n" if name else ""
        try:
            event = json.loads(payload)
        except ValueError:
            return f"{head}data: {payload}\n\n"  # `[DONE]` or the like: as it came
        if isinstance(event, dict):
            response = event.get("response")
            if event.get("type") in _TERMINAL and isinstance(response, dict):
                self._finish(model, response, view)
            else:
                view.event(event)
                if isinstance(response, dict) and "model" in response:
                    response["model"] = model.name
        text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        return f"{head}data: {text}\n\n"

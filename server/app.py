"""The FastAPI application: OpenAI-compatible endpoints plus feedback, metrics, health.

`create_app(settings)` builds the app and its `ServerRuntime` (on `app.state.runtime`); the
lifespan starts managed engines before the first request and stops them after uvicorn has drained
in-flight requests on SIGTERM. Everything below `/v1` may need a bearer API key; `/v1/feedback`
may use its own key; `/metrics`, `/health` and `/ready` are open (scraped by the platform).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from calibserve.server.errors import APIError, install_error_handlers
from calibserve.server.heap import settle_heap
from calibserve.server.limits import BodySizeLimit
from calibserve.server.metrics import CONTENT_TYPE
from calibserve.server.model_cards import engine_card, model_list
from calibserve.server.openai_schema import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    ModelCard,
    ModelList,
    ResponseObject,
    ResponsesRequest,
    TokenizeRequest,
)
from calibserve.server.outcomes import OutcomeCounter
from calibserve.server.passthrough import Forwarder
from calibserve.server.proxy import Proxy
from calibserve.server.responses import ResponsesProxy
from calibserve.server.runtime import ServerRuntime

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "invalid request: malformed JSON, wrong types, invalid parameters",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "request body too large",
        502: "the upstream answered with an error or invalid data",
        503: "the upstream or managed engine is unavailable (retry later)",
        504: "the upstream did not answer in time",
    }.items()
}
_FEEDBACK_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "malformed body or response id (not an id this "
          "server could have issued: wrong prefix, truncated, bad encoding, bad choice index)"},
    401: _ERRORS[401],
    404: {"model": ErrorResponse, "description": "well-formed id whose signature does not verify "
          "(forged or signed with another key), for a model not served here, or too old"},
    409: {"model": ErrorResponse, "description": "feedback for this response was already recorded"},
    413: _ERRORS[413],
}

# The 200 answer of the completion endpoints: JSON (the response model) or, with `stream: true`,
# Server-Sent Events. The event schema is left open: each event is vLLM's chunk (plus
# `confidence`/`calibserve`, see STREAM_DOC) and the last one is the literal `[DONE]`.
_STREAM_200: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {
        "description": "`data: {chunk}` events, then `data: [DONE]`"}}}},
}

STREAM_DOC = (
    "With `stream: true` the answer is Server-Sent Events as from vLLM. The chunk carrying a "
    "choice's `finish_reason` also carries its `confidence`; the last chunk before `[DONE]` "
    "carries `calibserve` and the signed `id` to send to /v1/feedback."
)


def _check_key(request: Request, keys: list[str]) -> None:
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token:
        for key in keys:
            if hmac.compare_digest(token.strip().encode(), key.encode()):
                return
    raise APIError(401, "Incorrect API key provided." if token else "Missing API key "
                   "(Authorization: Bearer ...).", code="invalid_api_key",
                   headers={"WWW-Authenticate": "Bearer"})


def create_app(settings: Any, runtime: ServerRuntime | None = None, *,
               settle: bool = False) -> FastAPI:
    """The calibserve app for `settings` (a ServerSettings); `runtime` to share a prebuilt one;
    `settle`: once started, settle the process's heap for serving (heap.py; the server process
    does, an app built inside tests does not)."""
    rt = runtime or ServerRuntime(settings)
    proxy = Proxy(rt)
    forwarder = Forwarder(rt)
    responses = ResponsesProxy(rt, forwarder)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not rt.started:
            await rt.start()
        if settle:
            settle_heap()
        try:
            yield
        finally:
            await rt.stop()

    app = FastAPI(
        title="calibserve",
        version="0.1.0",
        description="OpenAI-compatible proxy over vLLM that attaches a calibrated confidence to "
        "every answer, measures live calibration from feedback, and escalates low-confidence "
        "requests to a stronger model.",
        lifespan=lifespan,
    )
    app.state.runtime = rt
    app.state.settings = rt.settings
    install_error_handlers(app)
    # Added first, so it runs inside the body limit: a 413 refused up front is not counted.
    app.add_middleware(OutcomeCounter, metrics=rt.metrics)
    app.add_middleware(BodySizeLimit, max_bytes=rt.settings.max_body_bytes)

    # async: FastAPI runs plain-def dependencies in a thread pool, a costly hop per request.
    async def api_key(request: Request) -> None:
        _check_key(request, rt.settings.api_keys)

    async def feedback_key(request: Request) -> None:
        _check_key(request, rt.settings.feedback_keys or rt.settings.api_keys)

    @app.post("/v1/chat/completions", dependencies=[Depends(api_key)], tags=["openai"],
              response_model=ChatCompletionResponse, responses={**_STREAM_200, **_ERRORS},
              description="Chat completion with per-choice `confidence`. " + STREAM_DOC)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await proxy.handle(request, "chat", body.model_dump(exclude_unset=True))

    @app.post("/v1/completions", dependencies=[Depends(api_key)], tags=["openai"],
              response_model=CompletionResponse, responses={**_STREAM_200, **_ERRORS},
              description="Text completion with per-choice `confidence`. " + STREAM_DOC)
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await proxy.handle(request, "completions", body.model_dump(exclude_unset=True))

    @app.get("/v1/models", dependencies=[Depends(api_key)], tags=["openai"],
             response_model=ModelList, responses={401: _ERRORS[401]},
             description="The engine's own card (vLLM's fields) of each served model's primary "
             "tier, under the served name; calibserve's minimal card when the engine cannot "
             "say.")
    async def list_models() -> JSONResponse:
        return JSONResponse(await model_list(rt))

    @app.get("/v1/models/{model}", dependencies=[Depends(api_key)], tags=["openai"],
             response_model=ModelCard, responses={401: _ERRORS[401], 404: _ERRORS[404]},
             description="One card of /v1/models (vLLM has no such route; OpenAI's API does).")
    async def get_model(model: str) -> JSONResponse:
        return JSONResponse(await engine_card(proxy.lookup(model)))

    @app.post("/v1/feedback", dependencies=[Depends(feedback_key)], tags=["calibserve"],
              response_model=FeedbackResponse, responses=_FEEDBACK_ERRORS,
              description="Record whether the response with this `id` was right. Each response "
              "(and choice) counts once: a repeat gets 409. Malformed ids get 400; well-formed "
              "ids whose HMAC signature does not verify (forged, wrong key) get 404, as do ids "
              "for models not served here or too old to accept. For streams, use the `id` of "
              "the last chunk.")
    async def feedback(body: FeedbackRequest) -> FeedbackResponse:
        return rt.feedback.record(body)

    _engine_routes(app, forwarder, responses, api_key)

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}})
    async def metrics() -> Response:
        return Response(rt.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/health", tags=["ops"], description="The process is alive.")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], description="200 when every model's engine answers, "
             "else 503 with per-model state.",
             responses={503: {"description": "not ready"}})
    async def ready() -> JSONResponse:
        states = await rt.ready()
        ok = rt.started and all(states.values())
        return JSONResponse({"ready": ok, "models": states}, status_code=200 if ok else 503)

    # Last, so every route above wins: the rest of the engine's server, passed through as is.
    app.add_api_route("/{path:path}", _engine_route(forwarder),
                      methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                      dependencies=[Depends(api_key)], include_in_schema=False)
    app.openapi = lambda: _openapi(app, rt.settings.max_n)  # type: ignore[method-assign]
    return app


def _engine_routes(app: FastAPI, forwarder: Forwarder, responses: ResponsesProxy,
                   api_key: Any) -> None:
    """The engine's routes beyond chat and completions: the Responses API (scored) and
    tokenize / detokenize (passed through), in the OpenAPI document."""

    @app.post("/v1/responses", dependencies=[Depends(api_key)], tags=["openai"],
              response_model=ResponseObject, responses={**_STREAM_200, **_ERRORS},
              description="The Responses API, served by the model's primary tier (scored, not "
              "escalated), with `confidence` and `calibserve` (its `feedback_id` is the id for "
              "/v1/feedback) on the response object. With `stream: true` the engine's events; "
              "the terminal event's `response` carries them.")
    async def create_response(request: Request, body: ResponsesRequest) -> Response:
        return await responses.handle(request, body.model_dump(exclude_unset=True))

    @app.post("/tokenize", dependencies=[Depends(api_key)], tags=["engine"],
              responses=_ERRORS, description="Passed through to the engine unchanged.")
    async def tokenize(request: Request, body: TokenizeRequest) -> Response:
        return await forwarder.forward(request, "/tokenize")

    @app.post("/detokenize", dependencies=[Depends(api_key)], tags=["engine"],
              responses=_ERRORS, description="Passed through to the engine unchanged.")
    async def detokenize(request: Request, body: DetokenizeRequest) -> Response:
        return await forwarder.forward(request, "/detokenize")


def _engine_route(forwarder: Forwarder) -> Any:
    async def engine_route(request: Request, path: str) -> Response:
        return await forwarder.forward(request, "/" + path)

    return engine_route


def _openapi(app: FastAPI, max_n: int) -> dict[str, Any]:
    """FastAPI's document, corrected where calibserve differs from FastAPI's defaults.

    Invalid bodies get 400 in OpenAI's shape, never FastAPI's 422, so 422 and its schemas go;
    `n` gets the server's configured maximum (`max_n`), which a static schema cannot know.
    """
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      openapi_version=app.openapi_version, routes=app.routes,
                      separate_input_output_schemas=app.separate_input_output_schemas)
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        n = schemas.get(name, {}).get("properties", {}).get("n", {})
        for branch in [n, *n.get("anyOf", [])]:
            if branch.get("type") == "integer":
                branch["maximum"] = max_n
    app.openapi_schema = doc
    return doc


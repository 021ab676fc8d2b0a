"""OpenAI-shaped error responses and the exception handlers that produce them.

The one rule (docs/internals.md, HTTP fidelity): an error the engine produced (a 4xx) passes
through with its status and body unchanged (proxy.py); every error calibserve raises itself has
vLLM's shape, `{"error": {"message", "type", "param", "code"}}` with `code` the integer status and
`type` vLLM's naming, so OpenAI SDKs raise their usual exception classes and a client cannot tell
the two apart. Upstream failures map to 502 (bad response), 503 (unavailable), 504 (timeout).
The handlers record a refused request's outcome; outcomes.py counts it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from calibserve.server.outcomes import outcome_of

log = logging.getLogger("calibserve.server")

# vLLM's names for its errors (the openai SDK's exception classes), so that an error calibserve
# raises itself reads like the one vLLM would have raised.
_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}
VALIDATION_TYPE = "Bad Request"  # vLLM's type for a body that fails validation


class APIError(Exception):
    """An error to send to the client as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "BadRequestError" if status < 500 else
                                       "InternalServerError")
        self.param = param
        # Why, for logs and tests; the body's `code` is the status, as vLLM's is.
        self.reason = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.status)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    message: str, type: str, param: str | None = None, code: int | None = None  # noqa: A002
) -> dict[str, Any]:
    """OpenAI's error shape with vLLM's convention: `code` is the integer HTTP status."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return APIError(status, message, **kwargs).response()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None, "invalid_request"
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    param = ".".join(loc) or None  # vLLM's form: `body.max_tokens`
    if first.get("type") == "json_invalid":
        return f"We could not parse the JSON body of your request: {first.get('msg')}", None, (
            "invalid_json"
        )
    msg = first.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param, "invalid_request"


def install_error_handlers(app: FastAPI) -> None:
    """Turn every exception into an OpenAI-shaped JSON error."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        # Refused while checking the request (upstream and engine failures the proxy answers).
        outcome_of(request).refused(exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        outcome_of(request).refused(400)
        runtime = getattr(request.app.state, "runtime", None)
        if request.url.path == "/v1/feedback" and runtime is not None:
            # A body that fails validation is malformed feedback: count it like the ones the
            # feedback handler rejects itself, so abuse shows up in one metric.
            runtime.metrics.feedback.labels("", "malformed").inc()
        return error_response(400, message, type=VALIDATION_TYPE, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error: %s", exc)
        # Counted (server_error, model "") by OutcomeCounter, which the exception passed first.
        return error_response(500, "internal server error", code="internal_error")

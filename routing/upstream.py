"""An OpenAI-compatible upstream (vLLM or any hosted API) behind timeouts, retries and a breaker.

`base_url` may be given with or without its `/v1` root (`http://host:8000` and
`https://api.example.com/v1` both work, see identity.api_root); paths are relative to that root
and may carry a leading `/v1` (`/v1/chat/completions` == `chat/completions`). It is an
`UpstreamClient` (upstream_client.py); retries and circuit changes go to its `metrics`.

Timeouts: `timeout` bounds each attempt of a JSON request (headers and body together) and, for a
stream, both the wait for the response headers and every gap between two events; `connect_timeout`
bounds opening the TCP connection. They are enforced with asyncio deadlines on top of httpx's, so a
slow-dripping upstream cannot hold a request forever.
Retries (see retry.py) happen only before a response is used: a stream is never retried once its
first event has been read. Every failure ends up as one of the UpstreamError classes (errors.py).
`request_json`, `stream` and `open` (a request relayed as the client sent it: the Responses API
and the pass-through routes, its answer of any status handed back unread) share the one retry
loop, `_attempts`, and the breaker.

Hot path: when the transport offers `exchange` (a `RawExchange`, as the server's lean HTTP/1.1
transport does for plain-http upstreams), requests skip httpx's request/response machinery
(URL merging, cookies, header objects: about a fifth of a proxied request's CPU) and send
pre-built request heads; the bytes on the wire and the errors raised are the same.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import httpx

from calibserve.routing.breaker import CircuitBreaker
from calibserve.routing.errors import (
    CircuitOpen,
    UpstreamBadResponse,
    UpstreamClientError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from calibserve.routing.identity import api_root, server_root
from calibserve.routing.jsoncodec import loads
from calibserve.routing.metrics import RoutingMetrics, default_metrics
from calibserve.routing.retry import RetryPolicy, parse_retry_after
from calibserve.routing.sse import DONE, iter_sse_bytes, parse_chunk

_JSON_HEADERS = {"content-type": "application/json"}
_DONE = DONE.encode()


class RawAnswer(Protocol):
    """An answer read without httpx objects: status, raw headers, the body still to read."""

    status_code: int
    headers: list[tuple[bytes, bytes]]

    async def read(self) -> bytes: ...

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class RawExchange(Protocol):
    """A transport that sends a pre-built HTTP/1.1 request (see routing/transport.py)."""

    async def exchange(self, method: str, host: str, port: int, head: bytes, body: bytes,
                       connect_timeout: float | None) -> RawAnswer: ...


class _Answer(Protocol):
    """What the retry loop reads of an attempt's answer, whichever transport gave it."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> httpx.Headers | list[tuple[bytes, bytes]]: ...

    async def aclose(self) -> None: ...


_A = TypeVar("_A", bound=_Answer)


class _Read:
    """A JSON request's answer, its body read within the attempt's deadline."""

    __slots__ = ("status_code", "headers", "data")

    def __init__(self, status_code: int, headers: httpx.Headers | list[tuple[bytes, bytes]],
                 data: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.data = data

    async def aclose(self) -> None:
        return None


async def _read(answer: _Answer) -> bytes:
    """The whole body of an answer; its connection is released."""
    if isinstance(answer, _Read):
        return answer.data
    try:
        if isinstance(answer, httpx.Response):
            return await answer.aread()
        return await answer.read()  # type: ignore[attr-defined, no-any-return]
    finally:
        await answer.aclose()


def _header(headers: httpx.Headers | list[tuple[bytes, bytes]], name: bytes) -> str | None:
    raw = headers.raw if isinstance(headers, httpx.Headers) else headers
    for key, value in raw:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def encode_body(body: dict[str, Any] | None) -> bytes | None:
    """The request body as strict, ASCII-only JSON.

    httpx's `json=` encodes to UTF-8 without escaping, which fails on lone surrogates ("\\ud800"
    is valid JSON text a client may send); `ensure_ascii` escapes them instead. NaN and Infinity
    are not JSON: the server rejects them before they get here (ValueError if they do).
    """
    if body is None:
        return None
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode("ascii")


def relative_path(path: str) -> str:
    path = path.lstrip("/")
    return path[3:] if path.startswith("v1/") else path


class Upstream:
    """One OpenAI-compatible endpoint. Create inside or outside an event loop; use in one loop."""

    def __init__(
        self,
        name: str,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        *,
        connect_timeout: float = 5.0,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 256,
        metrics: RoutingMetrics | None = None,
    ) -> None:
        self.name = name
        self.metrics = metrics if metrics is not None else default_metrics()
        self.base_url = base_url
        self.root = api_root(base_url)
        self.server_url = server_root(base_url)
        self.timeout = float(timeout)
        self.connect_timeout = min(float(connect_timeout), self.timeout)
        self.retry = retry or RetryPolicy()
        # One breaker per upstream: a shared default instance would couple unrelated upstreams.
        self.breaker = breaker or CircuitBreaker()
        self.breaker.bind(name, self.metrics)
        self._headers = dict(headers or {})
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._transport = transport
        self._max_connections = max_connections
        self._client: httpx.AsyncClient | None = None
        self._raw = _raw_exchange(transport, self.root, self._headers)
        self._heads: dict[tuple[str, str], bytes] = {}
        root_url = httpx.URL(self.root)
        self._raw_host = root_url.host
        self._raw_port = root_url.port or 80
        fixed = {"host": root_url.netloc.decode("ascii"), "accept": "*/*",
                 "connection": "keep-alive", "user-agent": f"python-httpx/{httpx.__version__}",
                 **{k.lower(): v for k, v in self._headers.items()}, **_JSON_HEADERS}
        self._raw_fixed = b"".join(f"{k}: {v}\r\n".encode() for k, v in fixed.items())

    def __repr__(self) -> str:
        return f"Upstream(name={self.name!r}, base_url={self.base_url!r})"

    @property
    def client(self) -> httpx.AsyncClient:
        # Created lazily so an Upstream can be built at import/config time, outside any loop.
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers=self._headers,
                timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
                limits=httpx.Limits(
                    max_connections=self._max_connections,
                    max_keepalive_connections=self._max_connections,
                ),
                transport=self._transport,
            )
        return self._client

    def url(self, path: str) -> str:
        return f"{self.root}/{relative_path(path)}"

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _backoff_after(self, exc: BaseException, attempt: int) -> float:
        """How long to wait before retrying after `exc`; raises when it must not be retried.

        Only "unavailable" errors (connect refused, circuit open) are retried: a timeout may have
        reached a model that is still generating, and cancellation is not ours to swallow.
        """
        error = self._transport_error(exc)
        if error is None:
            raise exc
        if not isinstance(error, UpstreamUnavailable):
            raise error from exc
        delay = self.retry.delay(attempt)
        if delay is None:
            raise error from exc
        return delay

    async def request_json(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST `body` (GET when None) and return the decoded JSON object."""
        method = "GET" if body is None else "POST"
        content = encode_body(body)
        answer = await self._attempts(lambda: self._fetch(method, path, content))
        return self._decode(answer.data)

    async def open(self, method: str, target: str, content: bytes,
                   headers: Mapping[str, str]) -> httpx.Response:
        """Send a request as a client sent it and return the answer, any status, body unread.

        `target` is a path under the server root (not the `/v1` root), query included: the
        pass-through routes and the Responses API. Retries, the breaker and the errors raised
        when nothing answers are `request_json`'s; a status the retry policy retries is retried
        while attempts remain, and any other status comes back as the engine sent it.
        """
        url = self.server_url + target

        async def start() -> httpx.Response:
            request = self.client.build_request(method, url, content=content, headers=headers)
            return await self.client.send(request, stream=True)

        return await self._attempts(start, relay=True)

    async def _attempts(self, start: Callable[[], Awaitable[_A]], *, relay: bool = False) -> _A:
        """The one retry loop: `start` an attempt under the deadline until a 2xx answer.

        Unavailable upstreams (connect refused, circuit open) and the statuses the retry policy
        names are retried after its back-off; any other failure is raised as an UpstreamError.
        `relay`: a status that is not retried comes back unread instead of being raised.
        """
        attempt = 0
        while True:
            attempt += 1
            self._admit()
            delay: float | None
            try:
                async with asyncio.timeout(self.timeout):
                    answer = await start()
            except BaseException as exc:
                delay = self._backoff_after(exc, attempt)
            else:
                if 200 <= answer.status_code < 300:
                    self.breaker.record_success()
                    return answer
                delay = await (self._relay_delay(answer, attempt) if relay
                               else self._status_delay(answer, attempt))
                if delay is None:
                    return answer
            self.metrics.retried(self.name)
            await asyncio.sleep(delay)

    async def _status_delay(self, answer: _Answer, attempt: int) -> float:
        """The back-off before retrying a non-2xx answer; raises its error when not retried."""
        try:
            async with asyncio.timeout(self.timeout):
                data = await _read(answer)
        except BaseException as exc:
            error = self._transport_error(exc)
            if error is None:
                raise
            raise error from exc
        error, retryable = self._status_error(answer.status_code, answer.headers, data)
        delay = self.retry.delay(attempt, error.retry_after) if retryable else None
        if delay is None:
            raise error
        return delay

    async def _relay_delay(self, answer: _Answer, attempt: int) -> float | None:
        """The back-off before retrying a relayed non-2xx answer (dropped unread); None: the
        answer goes back to the client as it is."""
        status = answer.status_code
        self._record_status(status)
        if not self.retry.should_retry_status(status):
            return None
        retry_after = parse_retry_after(_header(answer.headers, b"retry-after"))
        delay = self.retry.delay(attempt, retry_after)
        if delay is not None:
            await answer.aclose()
        return delay

    async def _fetch(self, method: str, path: str, content: bytes | None) -> _Read:
        """One attempt of a JSON request: status, headers and the whole body."""
        if self._raw is not None:
            answer = await self._raw.exchange(
                method, self._raw_host, self._raw_port, self._head(method, path, content),
                content or b"", self.connect_timeout)
            return _Read(answer.status_code, answer.headers, await answer.read())
        response = await self.client.request(
            method, self.url(path), content=content, headers=_JSON_HEADERS
        )
        return _Read(response.status_code, response.headers, response.content)

    def _head(self, method: str, path: str, content: bytes | None) -> bytes:
        """The request line and headers httpx would send (less accept-encoding: the lean
        transport reads identity bodies only), built once per method and path."""
        key = (method, path)
        head = self._heads.get(key)
        if head is None:
            target = httpx.URL(self.url(path)).raw_path.decode("ascii")
            head = self._heads[key] = (
                f"{method} {target} HTTP/1.1\r\n".encode() + self._raw_fixed
            )
        if content is None:
            return head + b"\r\n"
        return head + b"content-length: " + str(len(content)).encode() + b"\r\n\r\n"

    async def stream(
        self, path: str, body: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """POST a streaming request and yield each SSE event's JSON object until `[DONE]`.

        Close the iterator (`contextlib.aclosing`) to abandon the stream: that closes the HTTP
        response, which makes vLLM abort the generation.
        """
        response = await self._open_stream(path, body)
        # Events split on bytes for both transports: httpx's text lines would also break an event
        # at a U+2028 inside its JSON (str.splitlines), which engines send unescaped.
        events = iter_sse_bytes(response.aiter_bytes() if isinstance(response, httpx.Response)
                                else response.aiter_raw())
        payload: bytes
        try:
            while True:
                try:
                    async with asyncio.timeout(self.timeout):
                        payload = await anext(events)
                except StopAsyncIteration:
                    return
                except BaseException as exc:
                    error = self._transport_error(exc, during_stream=True)
                    if error is None:
                        raise
                    raise error from exc
                if payload.strip() == _DONE:
                    return
                yield self._decode_event(payload)
        finally:
            await events.aclose()
            await response.aclose()

    async def _open_stream(self, path: str, body: dict[str, Any]
                           ) -> httpx.Response | RawAnswer:
        content = encode_body(body) or b""
        return await self._attempts(lambda: self._start_stream(path, content))

    async def _start_stream(self, path: str, content: bytes) -> httpx.Response | RawAnswer:
        if self._raw is not None:
            return await self._raw.exchange(
                "POST", self._raw_host, self._raw_port, self._head("POST", path, content),
                content, self.connect_timeout)
        request = self.client.build_request(
            "POST", self.url(path), content=content, headers=_JSON_HEADERS
        )
        return await self.client.send(request, stream=True)

    def _admit(self) -> None:
        if not self.breaker.allow():
            raise CircuitOpen("circuit open (recent failures); failing fast", upstream=self.name)

    def _transport_error(
        self, exc: BaseException, *, during_stream: bool = False
    ) -> UpstreamError | None:
        """Map a transport-level exception to an UpstreamError (and tell the breaker).

        Returns None for exceptions that are not the upstream's fault (cancellation, bugs):
        those propagate unchanged and leave the breaker's verdict open.
        """
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            self.breaker.record_failure()
            return UpstreamUnavailable(f"cannot connect: {exc!r}", upstream=self.name)
        if isinstance(exc, TimeoutError | httpx.TimeoutException):
            self.breaker.record_failure()
            what = "stopped streaming" if during_stream else "did not answer"
            return UpstreamTimeout(f"{what} within {self.timeout:g}s", upstream=self.name)
        if isinstance(exc, httpx.HTTPError):
            self.breaker.record_failure()
            return UpstreamBadResponse(
                f"transport error: {exc!r}", upstream=self.name, kind="protocol"
            )
        self.breaker.release()
        return None

    def _record_status(self, status: int) -> None:
        """A 5xx is a breaker failure; a 4xx means the upstream is alive and judged the request."""
        if status >= 500:
            self.breaker.record_failure()
        else:
            self.breaker.record_success()

    def _status_error(self, status: int, headers: httpx.Headers | list[tuple[bytes, bytes]],
                      data: bytes) -> tuple[UpstreamError, bool]:
        raw = headers.raw if isinstance(headers, httpx.Headers) else headers
        # `data` is already decoded: a content-encoding kept here would be decoded a second time.
        response = httpx.Response(status, content=data, headers=[
            (k, v) for k, v in raw if k.lower() != b"content-encoding"])
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        try:
            body: Any = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = response.text
        detail = _error_message(body) or response.reason_phrase
        message = f"HTTP {status}: {detail}"
        error: UpstreamError
        self._record_status(status)
        if status >= 500:
            # The engine's own answer travels with the error: the server passes it through.
            cls = UpstreamUnavailable if status == 503 else (
                UpstreamTimeout if status == 504 else UpstreamBadResponse)
            error = cls(message, upstream=self.name, kind="status", retry_after=retry_after,
                         answered=status, body=body)
        else:
            error = UpstreamClientError(
                message, status_code=status, body=body, upstream=self.name,
                retry_after=retry_after,
            )
        return error, self.retry.should_retry_status(status)

    def _decode(self, data: bytes) -> dict[str, Any]:
        try:
            obj = loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UpstreamBadResponse(
                "response is not JSON", upstream=self.name, kind="protocol"
            ) from exc
        if not isinstance(obj, dict):
            raise UpstreamBadResponse(
                "response is not a JSON object", upstream=self.name, kind="protocol"
            )
        return obj

    def _decode_event(self, payload: str | bytes) -> dict[str, Any]:
        try:
            chunk = parse_chunk(payload)
        except ValueError as exc:
            raise UpstreamBadResponse(
                f"bad SSE event: {_text(payload[:200])!r}", upstream=self.name, kind="protocol"
            ) from exc
        if "error" in chunk and "choices" not in chunk:
            # vLLM reports failures inside an open stream as an error event.
            raise UpstreamBadResponse(
                f"error event: {_error_message(chunk)}", upstream=self.name, body=chunk
            )
        return chunk


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(body)[:500]


def _text(payload: str | bytes) -> str:
    return payload if isinstance(payload, str) else payload.decode("utf-8", "replace")


def _raw_exchange(transport: httpx.AsyncBaseTransport | None, root: str,
                  headers: dict[str, str]) -> RawExchange | None:
    """The transport's `exchange` when it has one and the request can be pre-built."""
    if transport is None or not callable(getattr(transport, "exchange", None)):
        return None
    if not root.startswith("http://"):
        return None
    if any(ch in text for item in headers.items() for text in item for ch in "\r\n"):
        return None  # httpx refuses such headers; keep its path and its error
    return transport  # type: ignore[return-value]

"""A FAKE OpenAI upstream: canned chat/completions answers with logprobs, for overhead
measurement and fault injection only. It runs no model; nothing it says is a real answer.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies; parsed with httptools, the C
parser uvicorn uses) to answer as fast as possible, so that a benchmark measures the proxy in
front of it, not the fake. Endpoints: POST /v1/chat/completions, POST /v1/completions (stream or
not, `n`, `logprobs`/`top_logprobs`, `stream_options.include_usage`), GET /v1/models, /health.

Fault injection: POST /fake/mode with {"mode": M, "delay_ms": D} sets the behaviour of every later
request: `ok` (default), `error500`, `error503`, `error400`, `garbage` (200 with invalid JSON),
`hang` (never answers), `drop` (closes the connection without answering), `drop_mid_stream`
(streams two chunks, then closes), `slow` (waits delay_ms before answering).

Streams are written at once by default; `--stream-interval-ms D` paces them like an engine that
emits a token every D ms (the first event at once, each later one D ms after the one before, the
closing `data: [DONE]` right after the last), so a benchmark can time a proxy's first token and
its per-chunk cost. Non-streamed answers are never delayed.

    python -m calibserve.testing.openai_upstream --port 18310 [--model fake-model] [--tokens 8]
        [--stream-interval-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from typing import Any

import httptools

LETTERS = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K", "L", "M", "N", "O", "P", "Q",
           "R", "S", "T"]


class FakeState:
    def __init__(self, model: str, tokens: int, stream_interval_ms: float = 0.0) -> None:
        self.model = model
        self.tokens = tokens
        self.stream_interval = stream_interval_ms / 1000
        self.mode = "ok"
        self.delay_ms = 0.0
        self.requests = 0
        self._cache: dict[tuple[Any, ...], bytes] = {}

    # -- canned content --------------------------------------------------------------------
    def _token_lp(self, i: int) -> float:
        # Deterministic, varied logprobs: first token fairly confident, later ones less so.
        return -0.05 - 0.15 * (i % 4)

    def _chat_entry(self, i: int, top: int) -> dict[str, Any]:
        tok = LETTERS[i % 4] if i == 0 else f" t{i}"
        lp = self._token_lp(i)
        alts = [{"token": tok, "logprob": lp, "bytes": list(tok.encode())}]
        for j in range(1, top):
            alt = LETTERS[j % len(LETTERS)] + ("" if i == 0 else str(j))
            alt_lp = lp - 1.0 - j
            alts.append({"token": alt, "logprob": alt_lp, "bytes": list(alt.encode())})
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                "top_logprobs": alts[:top]}

    def _text(self) -> list[str]:
        return [LETTERS[0] if i == 0 else f" t{i}" for i in range(self.tokens)]

    def _completion_lp(self, top: int) -> dict[str, Any]:
        toks = self._text()
        tops = []
        for i, tok in enumerate(toks):
            d = {tok: self._token_lp(i)}
            for j in range(1, top):
                d[f"{tok}~{j}"] = self._token_lp(i) - 1.0 - j
            tops.append(d)
        offsets, pos = [], 0
        for tok in toks:
            offsets.append(pos)
            pos += len(tok)
        return {"tokens": toks, "token_logprobs": [self._token_lp(i) for i in range(len(toks))],
                "top_logprobs": tops, "text_offset": offsets}

    def _usage(self, n: int) -> dict[str, int]:
        return {"prompt_tokens": 12, "completion_tokens": self.tokens * n,
                "total_tokens": 12 + self.tokens * n}

    def answer(self, endpoint: str, req: dict[str, Any]) -> bytes:
        n = int(req.get("n") or 1)
        if endpoint == "chat":
            top = int(req.get("top_logprobs") or 0) if req.get("logprobs") else -1
        else:
            top = int(req["logprobs"]) if req.get("logprobs") is not None else -1
        key = ("answer", endpoint, n, top, str(req.get("model")))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        choices = []
        for idx in range(n):
            if endpoint == "chat":
                lp = ({"content": [self._chat_entry(i, top) for i in range(self.tokens)]}
                      if top >= 0 else None)
                choices.append({"index": idx, "message": {"role": "assistant",
                                "content": "".join(self._text())}, "logprobs": lp,
                                "finish_reason": "stop", "stop_reason": None})
            else:
                choices.append({"index": idx, "text": "".join(self._text()),
                                "logprobs": self._completion_lp(top) if top >= 0 else None,
                                "finish_reason": "stop", "stop_reason": None})
        body = {"id": ("chatcmpl-" if endpoint == "chat" else "cmpl-") + "fake0000",
                "object": "chat.completion" if endpoint == "chat" else "text_completion",
                "created": int(time.time()), "model": req.get("model") or self.model,
                "choices": choices, "usage": self._usage(n)}
        data = json.dumps(body).encode()
        self._cache[key] = data
        return data

    def stream_events(self, endpoint: str, req: dict[str, Any]) -> list[bytes]:
        n = int(req.get("n") or 1)
        if endpoint == "chat":
            top = int(req.get("top_logprobs") or 0) if req.get("logprobs") else -1
        else:
            top = int(req["logprobs"]) if req.get("logprobs") is not None else -1
        usage = bool((req.get("stream_options") or {}).get("include_usage"))
        key = ("stream", endpoint, n, top, usage, str(req.get("model")))
        cached = self._cache.get(key)
        if cached is not None:
            return cached  # type: ignore[return-value]
        obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
        base = {"id": ("chatcmpl-" if endpoint == "chat" else "cmpl-") + "fake0000",
                "object": obj, "created": int(time.time()),
                "model": req.get("model") or self.model}
        events: list[bytes] = []
        toks = self._text()
        for i, tok in enumerate(toks):
            for idx in range(n):
                last = i == len(toks) - 1
                if endpoint == "chat":
                    delta: dict[str, Any] = {"content": tok}
                    if i == 0:
                        delta["role"] = "assistant"
                    choice: dict[str, Any] = {
                        "index": idx, "delta": delta,
                        "logprobs": {"content": [self._chat_entry(i, top)]} if top >= 0 else None,
                        "finish_reason": "stop" if last else None,
                    }
                else:
                    full = self._completion_lp(top) if top >= 0 else None
                    lp = None
                    if full is not None:
                        lp = {"tokens": [tok], "token_logprobs": [full["token_logprobs"][i]],
                              "top_logprobs": [full["top_logprobs"][i]],
                              "text_offset": [full["text_offset"][i]]}
                    choice = {"index": idx, "text": tok, "logprobs": lp,
                              "finish_reason": "stop" if last else None}
                events.append(b"data: " + json.dumps({**base, "choices": [choice]}).encode()
                              + b"\n\n")
        if usage:
            events.append(b"data: " + json.dumps({**base, "choices": [],
                                                  "usage": self._usage(n)}).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        self._cache[key] = events  # type: ignore[assignment]
        return events


def _response(status: int, body: bytes, content_type: bytes = b"application/json",
              extra: bytes = b"") -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error",
              503: b"Service Unavailable"}.get(status, b"Status")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
            % (status, reason, content_type, len(body), extra) + body)


MAX_LOGPROBS = 20  # vLLM's --max-logprobs default


def _refusal(endpoint: str, req: dict[str, Any]) -> str | None:
    """What vLLM would refuse before generating (calibserve leaves ranges to the engine)."""
    top = req.get("top_logprobs") if endpoint == "chat" else req.get("logprobs")
    for name, value in (("logprobs", top), ("prompt_logprobs", req.get("prompt_logprobs"))):
        if value is not None and (not isinstance(value, int) or value > MAX_LOGPROBS
                                  or value < -1):
            return f"{name}={value!r} is out of range"
    n = req.get("n")
    if n is not None and (not isinstance(n, int) or n < 1):
        return f"n must be at least 1, got {n!r}."
    for key in ("max_tokens", "max_completion_tokens"):
        value = req.get(key)
        if value is not None and (not isinstance(value, int) or value < 0):
            return f"{key} must be at least 0, got {value!r}."
    return None


def _error(status: int, message: str) -> bytes:
    return _response(status, json.dumps({"error": {"message": message, "type": "FakeError",
                                                   "param": None, "code": status}}).encode())


class FakeProtocol(asyncio.Protocol):
    def __init__(self, state: FakeState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.tasks: set[asyncio.Task[None]] = set()

    # asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.write(_error(400, "bad request"))
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self.tasks:
            task.cancel()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0].decode()
        raw = b"".join(self.body)
        self.state.requests += 1
        mode = self.state.mode
        if path.startswith("/fake/") or mode == "ok" and path in ("/health", "/v1/models"):
            self._write(self._control(method, path, raw))
            return
        if mode == "ok":
            out = self._serve(path, raw)  # the fast path: no task, no await
            if isinstance(out, list) and self.state.stream_interval > 0 and len(out) > 4:
                self._write_paced(out)
            else:
                self._write(out)
            return
        task = asyncio.get_running_loop().create_task(self._faulty(path, raw, mode))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _write(self, data: bytes | list[bytes]) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if isinstance(data, list):
            self.transport.writelines(data)
        else:
            self.transport.write(data)

    def _write_paced(self, parts: list[bytes]) -> None:
        """Head and first event now, each later event `stream_interval` after the one before;
        the last event (`[DONE]`) and the terminating chunk go with the one before them."""
        head, *events, done, end = parts
        loop = asyncio.get_running_loop()
        interval = self.state.stream_interval

        def send(i: int) -> None:
            if self.transport is None or self.transport.is_closing():
                return  # the client went away: stop pacing
            if i == len(events) - 1:
                self._write([events[i], done, end])
                return
            self._write(events[i])
            loop.call_later(interval, send, i + 1)

        self._write(head)
        send(0)

    def _control(self, method: bytes, path: str, raw: bytes) -> bytes:
        if path == "/health":
            return _response(200, b"")
        if path == "/v1/models":
            return _response(200, json.dumps({"object": "list", "data": [
                {"id": self.state.model, "object": "model", "created": 0,
                 "owned_by": "fake"}]}).encode())
        if path == "/fake/mode" and method == b"POST":
            cfg = json.loads(raw or b"{}")
            self.state.mode = str(cfg.get("mode", "ok"))
            self.state.delay_ms = float(cfg.get("delay_ms", 0))
            return _response(200, json.dumps({"mode": self.state.mode}).encode())
        if path == "/fake/stats":
            return _response(200, json.dumps({"requests": self.state.requests,
                                              "mode": self.state.mode}).encode())
        return _error(404, "not found")

    def _serve(self, path: str, raw: bytes) -> bytes | list[bytes]:
        endpoint = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                    "/v1/responses": "responses", "/tokenize": "tokenize",
                    "/detokenize": "detokenize"}.get(path)
        if endpoint is None:
            return self._control(b"GET", path, raw)
        try:
            req = json.loads(raw)
        except ValueError:
            return _error(400, "invalid JSON")
        if not isinstance(req, dict):
            return _error(400, "body must be an object")
        if endpoint in ("responses", "tokenize", "detokenize"):
            return self._other(endpoint, req)
        refused = _refusal(endpoint, req)
        if refused is not None:
            return _error(400, refused)
        if req.get("stream"):
            events = self.state.stream_events(endpoint, req)
            head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n")
            parts = [head] + [b"%x\r\n%s\r\n" % (len(e), e) for e in events] + [b"0\r\n\r\n"]
            return parts
        return _response(200, self.state.answer(endpoint, req))

    def _other(self, endpoint: str, req: dict[str, Any]) -> bytes | list[bytes]:
        """The Responses API and tokenize/detokenize, canned like the rest."""
        if endpoint == "tokenize":
            return _response(200, json.dumps({"count": 3, "max_model_len": 256,
                                              "tokens": [1, 2, 3], "token_strs": None}).encode())
        if endpoint == "detokenize":
            return _response(200, json.dumps({"prompt": "t1 t2 t3"}).encode())
        top = req.get("top_logprobs")
        if top is not None and (not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS):
            return _error(400, f"top_logprobs={top!r} is out of range")
        include = req.get("include")
        want = isinstance(include, list) and "message.output_text.logprobs" in include
        k = int(top or 0)
        entries = ([{k2: v for k2, v in self.state._chat_entry(i, k + 1).items()}
                    for i in range(self.state.tokens)] if want else None)
        for entry in entries or []:
            entry["top_logprobs"] = entry["top_logprobs"][:k]
        text = "".join(self.state._text())
        part = {"annotations": [], "text": text, "type": "output_text", "logprobs": entries}
        item = {"id": "msg_fake", "content": [part], "role": "assistant",
                "status": "completed", "type": "message"}
        resp = {"id": "resp_fake0000", "created_at": int(time.time()), "object": "response",
                "model": req.get("model") or self.state.model,
                "output": [item], "status": "completed",
                "top_logprobs": k if want else None,
                "usage": {"input_tokens": 12, "output_tokens": self.state.tokens,
                          "total_tokens": 12 + self.state.tokens}}
        if not req.get("stream"):
            return _response(200, json.dumps(resp).encode())
        created = {"response": {**resp, "output": [], "status": "in_progress"}}
        events: list[tuple[str, dict[str, Any]]] = [("response.created", created),
                  ("response.output_text.delta", {"delta": text, "item_id": "msg_fake",
                                                  "output_index": 0, "content_index": 0,
                                                  "logprobs": entries or []}),
                  ("response.completed", {"response": resp})]
        body = [b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(
            {**data, "sequence_number": i, "type": name}).encode())
            for i, (name, data) in enumerate(events)]
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n")
        return [head] + [b"%x\r\n%s\r\n" % (len(e), e) for e in body] + [b"0\r\n\r\n"]

    async def _faulty(self, path: str, raw: bytes, mode: str) -> None:
        if mode == "slow":
            await asyncio.sleep(self.state.delay_ms / 1000)
            self._write(self._serve(path, raw))
        elif mode == "error500":
            self._write(_error(500, "fake upstream: injected internal error"))
        elif mode == "error503":
            self._write(_error(503, "fake upstream: injected unavailability"))
        elif mode == "error400":
            self._write(_error(400, "fake upstream: injected bad request"))
        elif mode == "garbage":
            self._write(_response(200, b"{not json", b"application/json"))
        elif mode == "hang":
            await asyncio.sleep(math.inf)
        elif mode == "drop":
            if self.transport:
                self.transport.abort()
        elif mode == "drop_mid_stream":
            out = self._serve(path, raw)
            if isinstance(out, list):
                self._write(out[:3])  # headers and two events
                await asyncio.sleep(0.05)
            if self.transport:
                self.transport.abort()
        else:
            self._write(self._serve(path, raw))


async def serve(host: str, port: int, model: str, tokens: int,
                stream_interval_ms: float = 0.0) -> None:
    state = FakeState(model, tokens, stream_interval_ms)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeProtocol(state), host, port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    print(f"fake upstream (canned answers, no model) on http://{host}:{bound}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18310)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--stream-interval-ms", type=float, default=0.0,
                        help="pace streamed events this far apart (0: all at once)")
    args = parser.parse_args()
    main_task = serve(args.host, args.port, args.model, args.tokens, args.stream_interval_ms)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_task)
    else:
        uvloop.run(main_task)


if __name__ == "__main__":
    main()

"""A FAKE OpenAI upstream that also records what happened to each request: for fault injection.

It is `openai_upstream` (canned answers, no model, nothing it says is a real answer)
plus what the reliability harness needs to observe from the upstream's side:

- `cancelled`: requests whose connection the client (calibserve) closed before the fake had
  finished answering: that is how an upstream sees a cancelled generation;
- `completed`, `in_flight`, `max_in_flight`, `bodies` (raw request bytes seen, to check that
  calibserve never forwards an oversized or invalid body);
- an extra mode `slow_stream`: stream events with `delay_ms` between them (a generation that
  takes a while), so that a client disconnecting mid-stream can be observed upstream.

Control: `POST /fake/mode {"mode", "delay_ms"}`, `GET /fake/stats`, `POST /fake/reset`.

    python -m calibserve.testing.recording_upstream --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from calibserve.testing.openai_upstream import FakeProtocol, FakeState, _response


class RecordingState(FakeState):
    """FakeState plus counters the harness reads through /fake/stats."""

    def __init__(self, model: str, tokens: int) -> None:
        super().__init__(model, tokens)
        self.reset()

    def reset(self) -> None:
        self.cancelled = 0
        self.completed = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bytes_in = 0
        self.largest_body = 0

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "mode": self.mode, "cancelled": self.cancelled,
                "completed": self.completed, "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight, "bytes_in": self.bytes_in,
                "largest_body": self.largest_body}


class RecordingProtocol(FakeProtocol):
    """Counts answers finished and answers abandoned because the peer went away."""

    state: RecordingState

    def on_message_complete(self) -> None:
        raw = b"".join(self.body)
        path = self.url.split(b"?", 1)[0].decode()
        if path == "/fake/stats":
            self._write(_response(200, json.dumps(self.state.stats()).encode()))
            return
        if path == "/fake/reset":
            self.state.reset()
            self.state.requests = 0
            self._write(_response(200, b"{}"))
            return
        if path.startswith("/v1/") and self.parser.get_method() == b"POST":
            self.state.bytes_in += len(raw)
            self.state.largest_body = max(self.state.largest_body, len(raw))
        if self.state.mode == "slow_stream" and path.startswith("/v1/"):
            self.state.requests += 1
            task = asyncio.get_running_loop().create_task(self._tracked(self._slow(path, raw)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        if self.state.mode in ("slow", "hang") and path.startswith("/v1/"):
            self.state.requests += 1
            task = asyncio.get_running_loop().create_task(
                self._tracked(self._faulty(path, raw, self.state.mode)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        super().on_message_complete()
        if path.startswith("/v1/") and self.state.mode == "ok":
            self.state.completed += 1

    async def _tracked(self, work: Any) -> None:
        s = self.state
        s.in_flight += 1
        s.max_in_flight = max(s.max_in_flight, s.in_flight)
        try:
            await work
            if self.transport is not None and not self.transport.is_closing():
                s.completed += 1
            else:
                s.cancelled += 1  # the peer closed before the answer was out
        except asyncio.CancelledError:
            s.cancelled += 1  # connection_lost cancelled us: the peer went away
            raise
        finally:
            s.in_flight -= 1

    async def _slow(self, path: str, raw: bytes) -> None:
        out = self._serve(path, raw)
        parts = out if isinstance(out, list) else [out]
        for part in parts:
            if self.transport is None or self.transport.is_closing():
                return
            self._write(part)
            await asyncio.sleep(self.state.delay_ms / 1000)


async def serve(host: str, port: int, model: str, tokens: int) -> None:
    state = RecordingState(model, tokens)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: RecordingProtocol(state), host, port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    print(f"fake upstream (recording; canned answers, no model) on http://{host}:{bound}",
          flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.model, args.tokens))


if __name__ == "__main__":
    main()

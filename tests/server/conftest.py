"""Fixtures for server tests: calibserve on a real socket, and the fake upstream for faults."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.config import ServerSettings

REPO = Path(__file__).resolve().parents[2]
SIGNING_KEY = "test-signing-key"


class RunningServer:
    """calibserve served by uvicorn in a background thread (real HTTP, real event loop)."""

    def __init__(self, settings: ServerSettings, start_timeout: float = 600.0) -> None:
        self.app = create_app(settings)
        self.runtime = self.app.state.runtime
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"calibserve did not start: {self.error!r}")
            time.sleep(0.05)
        sock = self.server.servers[0].sockets[0]
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def _run(self) -> None:
        try:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.serve())
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            self.error = exc

    def call(self, coro: object, timeout: float = 60.0) -> object:
        """Run a coroutine on the server's loop (e.g. to poke the runtime)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@contextmanager
def serve(settings: ServerSettings) -> Iterator[RunningServer]:
    running = RunningServer(settings)
    try:
        yield running
    finally:
        running.stop()


class FakeUpstream:
    """benchmarks/fake_upstream.py (canned answers, fault injection) in a subprocess."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / "fake_upstream.py"), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"http://[\d.]+:(\d+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"fake upstream did not start: {line!r}")
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def mode(self, mode: str, delay_ms: float = 0) -> None:
        httpx.post(f"{self.url}/fake/mode", json={"mode": mode, "delay_ms": delay_ms}, timeout=5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    yield fake
    fake.stop()


@pytest.fixture
def serve_settings() -> Callable[..., ServerSettings]:
    def make(**kwargs: object) -> ServerSettings:
        kwargs.setdefault("signing_key", SIGNING_KEY)
        return ServerSettings.model_validate(kwargs)

    return make

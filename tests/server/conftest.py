"""Fixtures for server tests: calibserve on a real socket, and the fake upstream for faults."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from benchmarks.reliability.harness import InProcessServer
from calibserve.server.config import ServerSettings

REPO = Path(__file__).resolve().parents[2]
SIGNING_KEY = "test-signing-key"


class RunningServer(InProcessServer):
    """calibserve served by uvicorn in a background thread (real HTTP, real event loop)."""

    def call(self, coro: object, timeout: float = 60.0) -> object:
        """Run a coroutine on the server's loop (e.g. to poke the runtime)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]


@contextmanager
def serve(settings: ServerSettings) -> Iterator[RunningServer]:
    running = RunningServer(settings)
    try:
        yield running
    finally:
        running.stop()


class FakeUpstream:
    """tests/fakes/openai_upstream.py (canned answers, fault injection) in a subprocess."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "fakes" / "openai_upstream.py"), "--port", "0"],
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

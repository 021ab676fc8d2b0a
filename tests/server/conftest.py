"""Fixtures for server tests: calibserve on a real socket, and the fake upstream for faults."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from calibserve.server.config import ServerSettings
from calibserve.testing.fake_upstream import FakeUpstream
from calibserve.testing.servers import InProcessServer

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

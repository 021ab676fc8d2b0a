"""The server process settles its heap once started (server/heap.py); apps built in tests do not."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from calibserve.server import heap
from calibserve.server.app import create_app
from calibserve.server.config import ServerSettings


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    frozen = gc.get_freeze_count()
    assert frozen == 0, "another test left the heap frozen"
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def settings() -> ServerSettings:
    return ServerSettings.model_validate({
        "models": [{"name": "heap", "upstreams": ["http://127.0.0.1:9/v1"],
                    "upstream_model": "heap"}],
        "signing_key": "test-only",
    })


def test_settle_heap_freezes_start_up_objects_and_raises_the_young_threshold(
        restore_gc: None) -> None:
    gc.set_threshold(700, 10, 10)
    survivor = {"start-up": [object() for _ in range(100)]}
    heap.settle_heap()
    assert gc.get_freeze_count() >= len(survivor["start-up"])
    assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, 10, 10)
    assert gc.isenabled()


def test_settle_heap_never_lowers_a_higher_threshold(restore_gc: None) -> None:
    gc.set_threshold(heap.YOUNG_THRESHOLD * 3, 20, 30)
    heap.settle_heap()
    assert gc.get_threshold() == (heap.YOUNG_THRESHOLD * 3, 20, 30)


@pytest.mark.parametrize("settle", [True, False])
def test_the_app_settles_only_when_asked(restore_gc: None, settle: bool) -> None:
    with TestClient(create_app(settings(), settle=settle)) as client:  # runs the lifespan
        assert client.get("/health").status_code == 200
        assert (gc.get_freeze_count() > 0) is settle


def test_the_server_process_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from calibserve.server import app as app_module
    from calibserve.server.cli import run_server

    asked: dict[str, Any] = {}

    def recording_create_app(s: Any, runtime: Any = None, *, settle: bool = False) -> Any:
        asked["settle"] = settle
        # What run_server reads of the app: the runtime's metrics (the connection gauge's).
        return SimpleNamespace(state=SimpleNamespace(runtime=SimpleNamespace(metrics=None)))

    monkeypatch.setattr(app_module, "create_app", recording_create_app)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    run_server(settings())
    assert asked == {"settle": True}

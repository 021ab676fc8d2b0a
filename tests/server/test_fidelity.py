"""Fidelity: the corpus of request kinds (fidelity.py) against real vLLM directly and through
calibserve (`--upstream` style, in-process), diffed field by field after the allow-list.

Floor (issue 14): every kind identical apart from the allow-listed additions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from calibserve.server.config import ServerSettings
from tests.server.conftest import RunningServer, serve
from tests.server.fidelity import CORPUS, MODEL, compare, send

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(vllm_server: Callable[[Path, str], str], merged_dir: Path) -> str:
    return vllm_server(merged_dir / "model", MODEL)


@pytest.fixture(scope="module")
def calibserve(engine: str, merged_dir: Path) -> Iterator[RunningServer]:
    settings = ServerSettings.model_validate({
        "signing_key": "fidelity", "host": "127.0.0.1",
        "models": [{"name": MODEL, "upstreams": [engine], "upstream_model": MODEL,
                    "calibration": str(merged_dir / "model" / "calibration.json")}]})
    with serve(settings) as running:
        yield running


def test_every_kind_is_identical_apart_from_the_allow_list(
    engine: str, calibserve: RunningServer
) -> None:
    differing: dict[str, list[str]] = {}
    with httpx.Client() as client:
        for kind in CORPUS:
            found = compare(client, kind, engine, calibserve.url)
            if found:
                differing[kind.name] = found[:8]
    identical = len(CORPUS) - len(differing)
    print(f"fidelity: {identical}/{len(CORPUS)} kinds identical apart from the allow-list")
    assert not differing, differing


def test_additions_are_there(calibserve: RunningServer) -> None:
    """The allow-listed additions are not just tolerated: they are present."""
    with httpx.Client(base_url=calibserve.url, timeout=60) as c:
        chat = c.post("/v1/chat/completions", json=CORPUS[0].body)
        assert chat.headers["x-calibserve-served-by"] == MODEL
        assert chat.json()["choices"][0]["confidence"]["method"]
        assert chat.json()["id"].startswith("chatcmpl-")
        r = c.post("/v1/responses", json={"model": MODEL, "input": "question : what ?",
                                          "max_output_tokens": 2, "temperature": 0})
        body = r.json()
        assert body["id"].startswith("resp_") and 0 <= body["confidence"]["score"] <= 1
        assert "x-calibserve-confidence" in r.headers
        fb = c.post("/v1/feedback", json={"id": body["calibserve"]["feedback_id"],
                                          "correct": True})
        assert fb.status_code == 200, fb.text
        # GET /v1/models/{id}: vLLM has none; calibserve's is the engine's card of the list.
        card = c.get(f"/v1/models/{MODEL}").json()
        listed = c.get("/v1/models").json()["data"][0]
        assert card["max_model_len"] == listed["max_model_len"] and card["owned_by"] == "vllm"
        assert {k: v for k, v in card.items() if k not in ("created", "permission")} == {
            k: v for k, v in listed.items() if k not in ("created", "permission")}


def test_engine_error_kinds_are_engine_errors(engine: str) -> None:
    """The corpus's engine-error kinds do fail inside the engine (else they test nothing): a
    5xx status, or for the stream an error event in vLLM's shape."""
    with httpx.Client() as client:
        for kind in CORPUS:
            if kind.name.startswith("engine 500"):
                assert send(client, engine, kind).status >= 500, kind.name
            elif kind.name.startswith("engine error event"):
                events = send(client, engine, kind).events
                assert any(isinstance(data, dict) and data.get("error", {}).get("code") == 500
                           for _, data in events), kind.name

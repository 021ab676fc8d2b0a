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
from tests.server.fidelity import CORPUS, ENGINE_5XX, MODEL, compare, send

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


def test_an_engine_5xx_is_a_502(engine: str, calibserve: RunningServer) -> None:
    """The one documented difference: the engine's 500 comes back as calibserve's 502."""
    with httpx.Client() as client:
        direct = send(client, engine, ENGINE_5XX)
        via = send(client, calibserve.url, ENGINE_5XX)
    if direct.status != 500:
        pytest.skip(f"the engine answers {direct.status} here now: nothing to map")
    assert via.status == 502 and via.body["error"]["code"] == 502

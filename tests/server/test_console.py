"""What `calibserve serve` prints besides its log: the ready block, and a failed engine's line."""

from __future__ import annotations

import json
import logging
import shlex
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from calibserve.calibration.mc_prompt import format_mc_prompt
from calibserve.server.config import ServerSettings
from calibserve.server.console import (
    EngineStartFailureLine,
    announce_when_ready,
    example_body,
    example_request,
    ready_block,
)

MC_ITEM = {"question": "what does the zorp eat ?", "choices": ["fish", "moss's", "seeds"],
           "answer": 1}


def merged_like(tmp_path: Path) -> Path:
    """A model directory as merge writes it: calibration.json and probes.jsonl beside it."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "calibration.json").write_text("{}")
    (model / "probes.jsonl").write_text(json.dumps(MC_ITEM) + "\n")
    return model


def settings_for(model: Path, **kw: object) -> ServerSettings:
    return ServerSettings.model_validate({"models": [{"name": "merged", "model": str(model)}],
                                          **kw})


def curl_body(command: str) -> dict[str, object]:
    words = shlex.split(command)
    assert words[:2] == ["curl", "-s"]
    body = json.loads(words[words.index("-d") + 1])
    assert isinstance(body, dict)
    return body


def test_the_example_asks_a_held_out_question_and_pastes_into_a_shell(tmp_path: Path) -> None:
    settings = settings_for(merged_like(tmp_path), port=8123)
    body = example_body(settings)
    assert body == {"model": "merged", "max_tokens": 1,  # the option letter
                    "messages": [{"role": "user", "content": format_mc_prompt(MC_ITEM)}]}
    command = example_request(settings)
    assert curl_body(command) == body  # the quote in "moss's" survives the shell
    assert "http://127.0.0.1:8123/v1/chat/completions" in shlex.split(command)  # not 0.0.0.0
    assert "Authorization" not in command


def test_without_probes_the_example_is_a_plain_question(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, host="10.0.0.5", port=9000,
                            api_keys=["sk-secret"])
    command = example_request(settings)
    body = curl_body(command)
    assert body["max_tokens"] == 16 and body["model"] == "merged"
    assert "http://10.0.0.5:9000/v1/chat/completions" in command
    assert '-H "Authorization: Bearer $CALIBSERVE_API_KEY"' in command
    assert "sk-secret" not in command  # the key itself is never printed


def test_the_ready_block_is_short_and_says_what_confidence_means(tmp_path: Path) -> None:
    settings = settings_for(merged_like(tmp_path), port=8123)
    block = ready_block(settings)
    lines = block.splitlines()
    assert len(lines) == 4
    assert lines[0] == ("calibserve is ready: http://127.0.0.1:8123/v1 (OpenAI-compatible API; "
                        "model: merged)")
    assert '"confidence"' in lines[2] and "probability that it is right" in lines[2]
    assert "http://127.0.0.1:8123/metrics" in lines[3]
    report = tmp_path / "out" / "report.html"
    with_report = ready_block(settings, report).splitlines()
    assert len(with_report) == 5 and str(report) in with_report[-1]


class ReadyAfter(BaseHTTPRequestHandler):
    """/ready answers 503 for the server's first `not_ready` calls, then 200."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        server = self.server
        assert isinstance(server, FakeServer)
        server.calls += 1
        self.send_response(200 if server.calls > server.not_ready else 503)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class FakeServer(ThreadingHTTPServer):
    calls = 0
    not_ready = 2


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server = FakeServer(("127.0.0.1", 0), ReadyAfter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_block_is_printed_once_ready_answers(tmp_path: Path, fake_server: FakeServer) -> None:
    port = fake_server.server_address[1]
    assert isinstance(port, int)
    settings = settings_for(tmp_path, host="127.0.0.1", port=port)
    printed: list[str] = []
    announcer = announce_when_ready(settings, write=printed.append)
    assert announcer is not None
    announcer.thread.join(10)
    assert not announcer.thread.is_alive() and fake_server.calls == 3  # two 503s, then 200
    assert printed == [ready_block(settings)] and announcer.announced


def test_a_server_that_stops_first_cancels_the_announcement(tmp_path: Path) -> None:
    from calibserve.server.ports import free_port

    settings = settings_for(tmp_path, host="127.0.0.1", port=free_port())  # nothing listens
    printed: list[str] = []
    announcer = announce_when_ready(settings, write=printed.append)
    assert announcer is not None
    announcer.cancel()
    announcer.thread.join(5)
    assert not announcer.thread.is_alive() and not printed


def test_nothing_is_announced_without_a_known_port(tmp_path: Path) -> None:
    assert announce_when_ready(settings_for(tmp_path, port=0)) is None
    assert announce_when_ready(ServerSettings()) is None


def test_an_engine_start_failure_is_its_own_line() -> None:
    traceback = (
        "Traceback (most recent call last):\n  File \"starlette/routing.py\", line 661\n"
        "    async with self.lifespan_context(app) as maybe_state:\n"
        "calibserve.server.engine.EngineStartError: vLLM engine 'm' exited with code 1 while "
        "starting: ValueError: bad (log: runs/x/engine-m.log)\n")
    record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, traceback, (), None)
    assert EngineStartFailureLine().filter(record)
    assert record.getMessage() == ("vLLM engine 'm' exited with code 1 while starting: "
                                   "ValueError: bad (log: runs/x/engine-m.log)")
    other = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1,
                              "Traceback (most recent call last):\nKeyError: 'x'\n", (), None)
    assert EngineStartFailureLine().filter(other) and other.getMessage().count("\n") == 2

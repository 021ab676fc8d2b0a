"""Slow and idle clients (server/connections.py): header, body, keep-alive and write deadlines,
the open-connection cap and its gauge, on calibserve over the recording FAKE upstream.

Deadlines are set to about a second here; each check allows generous slack above a deadline
(the machine is shared) and none below it, so what is asserted is the behaviour, not a floor.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer

from calibserve.server.cli import settings_from_cli
from calibserve.server.config import ServerSettings
from calibserve.server.connections import ConnectionLimits, default_max_connections
from calibserve.testing.checks import chat_body, is_openai_error, metric_sum, scrape, tcp_state
from calibserve.testing.fake_upstream import FakeUpstream
from calibserve.testing.servers import InProcessServer, fake_settings

DEADLINE = 1.0
WRITE_DEADLINE = 2.0  # the long streams' (draining a socket buffer takes a while on a busy CPU)
SLACK = 4.0  # above a deadline, for a loaded 2-core machine
HALF = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def server(fake: FakeUpstream) -> Iterator[InProcessServer]:
    settings = fake_settings(fake.url, header_timeout_s=DEADLINE, body_timeout_s=DEADLINE,
                             keep_alive_timeout_s=DEADLINE, write_timeout_s=DEADLINE)
    with InProcessServer(settings) as srv:
        yield srv


def connect(srv: InProcessServer, rcvbuf: int = 0) -> socket.socket:
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    return sock


def until_closed(sock: socket.socket, timeout: float = DEADLINE + SLACK) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and when it closed (seconds from now)."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            part = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"still open after {timeout} s; got {data[:200]!r}") from None
        except ConnectionResetError:
            break
        if not part:
            break
        data += part
    return data, time.monotonic() - t0


def request(body: bytes, *, keep_alive: bool = False, length: int | None = None) -> bytes:
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body) if length is None else length}\r\n"
            f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode() + body


def status_and_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def serving(srv: InProcessServer) -> None:
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=chat_body(), timeout=10)
    assert r.status_code == 200 and "confidence" in r.json()["choices"][0]


def timeouts(srv: InProcessServer, kind: str) -> float:
    return metric_sum(scrape(srv.url), "calibserve_connection_timeouts_total", kind=kind)


# -- header deadline ---------------------------------------------------------------------------

def test_a_half_sent_request_gets_408_and_the_connection_closes(server: InProcessServer) -> None:
    before = timeouts(server, "header")
    with connect(server) as sock:
        t0 = time.monotonic()
        sock.sendall(HALF)
        raw, _ = until_closed(sock)
        took = time.monotonic() - t0
    status, body = status_and_body(raw)
    assert status == 408 and is_openai_error(json.loads(body))
    assert json.loads(body)["error"]["code"] == 408
    assert b"connection: close" in raw.lower()
    assert DEADLINE * 0.8 <= took <= DEADLINE + SLACK
    assert timeouts(server, "header") == before + 1
    serving(server)


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
        server: InProcessServer) -> None:
    with connect(server) as sock:
        raw, took = until_closed(sock)
    assert raw == b""
    assert took >= DEADLINE * 0.8


def test_headers_trickled_in_do_not_push_the_deadline_back(server: InProcessServer) -> None:
    with connect(server) as sock:
        t0 = time.monotonic()
        sock.sendall(HALF)
        sock.settimeout(0.2)
        raw = b""
        for i in range(int((DEADLINE + SLACK) / 0.2)):
            try:
                sock.sendall(f"x-slow-{i}: a\r\n".encode())
                part = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not part:
                break
            raw += part
        took = time.monotonic() - t0
    assert status_and_body(raw)[0] == 408, raw[:200]
    assert took <= DEADLINE + SLACK


def test_a_half_sent_second_request_on_a_kept_alive_connection_gets_408(
        server: InProcessServer) -> None:
    with connect(server) as sock:
        sock.sendall(request(json.dumps(chat_body()).encode(), keep_alive=True))
        sock.settimeout(10)
        first = sock.recv(65536)
        assert status_and_body(first)[0] == 200
        sock.sendall(HALF)
        raw, _ = until_closed(sock)
    assert status_and_body(raw)[0] == 408


# -- body deadline -----------------------------------------------------------------------------

def test_a_body_that_stops_gets_408_and_never_reaches_the_upstream(
        server: InProcessServer, fake: FakeUpstream) -> None:
    before = fake.stats()["requests"]
    body = json.dumps(chat_body()).encode()
    with connect(server) as sock:
        t0 = time.monotonic()
        sock.sendall(request(body[:10], length=len(body)))
        raw, _ = until_closed(sock)
        took = time.monotonic() - t0
    status, answer = status_and_body(raw)
    assert status == 408 and is_openai_error(json.loads(answer))
    assert DEADLINE * 0.8 <= took <= DEADLINE + SLACK
    assert fake.stats()["requests"] == before
    serving(server)


def test_a_slow_body_that_keeps_coming_is_served(server: InProcessServer) -> None:
    body = json.dumps(chat_body()).encode()
    pieces = [body[i:i + 12] for i in range(0, len(body), 12)]
    with connect(server) as sock:
        sock.sendall(request(b"", length=len(body)))
        t0 = time.monotonic()
        for piece in pieces:  # each well inside the body deadline, all of them well past it
            time.sleep(DEADLINE * 0.3)
            sock.sendall(piece)
        sent_over = time.monotonic() - t0
        raw, _ = until_closed(sock, 10)
    assert sent_over > DEADLINE * 1.5
    status, answer = status_and_body(raw)
    assert status == 200 and "confidence" in json.loads(answer)["choices"][0]


def test_a_body_sent_after_100_continue_is_served(server: InProcessServer) -> None:
    body = json.dumps(chat_body()).encode()
    head = request(b"", length=len(body)).replace(b"\r\n\r\n", b"\r\nexpect: 100-continue\r\n\r\n")
    with connect(server) as sock:
        sock.sendall(head)
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        raw, _ = until_closed(sock, 10)
    assert status_and_body(raw)[0] == 200


# -- keep-alive deadline -----------------------------------------------------------------------

def test_an_idle_kept_alive_connection_is_closed(server: InProcessServer) -> None:
    before = timeouts(server, "keep_alive")
    with connect(server) as sock:
        sock.sendall(request(json.dumps(chat_body()).encode(), keep_alive=True))
        sock.settimeout(10)
        assert status_and_body(sock.recv(65536))[0] == 200
        raw, took = until_closed(sock)
    assert raw == b""  # nothing was asked: no 408
    assert took >= DEADLINE * 0.8
    assert timeouts(server, "keep_alive") >= before + 1


# -- the cap and the gauge ---------------------------------------------------------------------

def test_over_the_cap_a_new_connection_gets_a_fast_503(fake: FakeUpstream) -> None:
    # Long deadlines: the 503 cannot come from one of them.
    settings = fake_settings(fake.url, max_connections=3, header_timeout_s=60)
    with InProcessServer(settings) as srv:
        held = [connect(srv) for _ in range(3)]
        try:
            deadline = time.monotonic() + 5
            while srv.guard.open < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            with connect(srv) as sock:
                sock.sendall(request(json.dumps(chat_body()).encode()))
                raw, took = until_closed(sock, 5)
            status, body = status_and_body(raw)
            assert status == 503 and is_openai_error(json.loads(body))
            assert b"retry-after: 1" in raw.lower()
            assert took < 5  # not held: answered and closed at once
            assert srv.guard.refused == 1 and srv.guard.open == 3
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5
        while srv.guard.open and time.monotonic() < deadline:
            time.sleep(0.01)
        serving(srv)
        m = scrape(srv.url)
        assert metric_sum(m, "calibserve_connections_refused_total") == 1


def test_the_open_connections_gauge_follows_connections(server: InProcessServer) -> None:
    def gauge() -> float:
        with httpx.Client() as client:  # one connection: the scrape's own
            text = client.get(f"{server.url}/metrics", timeout=10).text
        return metric_sum(scrape_text(text), "calibserve_open_connections")

    def settle(want: float) -> float:
        deadline = time.monotonic() + 5
        value = gauge()
        while value != want and time.monotonic() < deadline:
            time.sleep(0.05)
            value = gauge()
        return value

    base = settle(1.0)
    held = [connect(server) for _ in range(5)]
    try:
        assert settle(base + 5) == base + 5
    finally:
        for sock in held:
            sock.close()
    assert settle(base) == base


def scrape_text(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from calibserve.testing.checks import parse_metrics

    return parse_metrics(text)


# -- writes to slow readers --------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_stream_server() -> Iterator[InProcessServer]:
    """A FAKE whose streams are megabytes long (more than the kernel's socket buffers hold)."""
    with FakeUpstream(tokens=40_000) as upstream:
        settings = fake_settings(upstream.url, write_timeout_s=WRITE_DEADLINE)
        with InProcessServer(settings) as srv:
            yield srv


def writes_waiting(srv: InProcessServer) -> bool:
    """Some connection's response writes wait on a full send buffer (uvicorn's flow control)."""
    return any(getattr(getattr(p, "flow", None), "write_paused", False)
               for p in list(srv.server.server_state.connections))


def test_a_slow_reader_of_a_stream_gets_all_of_it(long_stream_server: InProcessServer) -> None:
    """The reader lets the server's writes wait again and again, each time for less than the
    write deadline and for longer than it in all: the stream goes on to its end."""
    srv = long_stream_server
    cut = srv.guard.timeouts["write"]
    stalls: list[float] = []  # from seeing the writes wait to their going on again
    raw = bytearray()
    with connect(srv, rcvbuf=4096) as sock:
        sock.sendall(request(json.dumps(chat_body(stream=True)).encode()))
        sock.settimeout(30)
        while b"data: [DONE]" not in raw[-200:]:
            # After a stall the writes wait again within milliseconds of our not reading, unless
            # the stream's end already fits the buffers: then nothing waits, the server's close
            # waits on us instead, and that wait has the same write deadline. So we wait for a
            # stall at most half the deadline (it was 3 s: the close's 2 s ran out first, a reset).
            deadline = time.monotonic() + (30 if not stalls else WRITE_DEADLINE / 2)
            while not writes_waiting(srv) and time.monotonic() < deadline:
                time.sleep(0.01)  # not reading: the socket buffers fill, the writes wait
            waited = writes_waiting(srv)
            t0 = time.monotonic()
            if waited:
                time.sleep(WRITE_DEADLINE * 0.25)  # they wait on us
            # Read until the server writes again (the kernel lets it once about half its
            # buffer has drained); once it no longer waits, to the end.
            while b"data: [DONE]" not in raw[-200:]:
                part = sock.recv(65536)
                assert part, f"closed after {len(raw)} bytes, stalls {stalls}"
                raw += part
                if waited and not writes_waiting(srv):
                    stalls.append(time.monotonic() - t0)
                    break
    assert sum(stalls) > WRITE_DEADLINE, stalls  # longer than the deadline in all
    assert max(stalls) < WRITE_DEADLINE, stalls  # each within it
    assert srv.guard.timeouts["write"] == cut


def test_a_reader_that_never_reads_is_cut_off(long_stream_server: InProcessServer) -> None:
    srv = long_stream_server
    cut = srv.guard.timeouts["write"]
    with connect(srv, rcvbuf=4096) as sock:
        sock.sendall(request(json.dumps(chat_body(stream=True)).encode()))
        deadline = time.monotonic() + WRITE_DEADLINE + SLACK + 5
        while srv.guard.timeouts["write"] == cut and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.guard.timeouts["write"] == cut + 1
        # Reset, not an orphan socket still queueing megabytes for it: the client's kernel
        # sees the close without a byte being read.
        deadline = time.monotonic() + SLACK
        while tcp_state(sock) == 1 and time.monotonic() < deadline:  # 1: ESTABLISHED
            time.sleep(0.02)
        assert tcp_state(sock) == 7  # CLOSE: reset by the server
    deadline = time.monotonic() + 5
    while srv.guard.open and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.guard.open == 0
    time.sleep(WRITE_DEADLINE * 1.5)
    assert srv.guard.timeouts["write"] == cut + 1  # counted once


def test_cutting_off_a_reader_cancels_its_upstream_request() -> None:
    """A reader that never reads, of an answer still being generated: once the write deadline
    cuts it off, the upstream request is cancelled (the FAKE counts a request whose connection
    closed under an unfinished answer)."""
    with FakeUpstream(tokens=2000) as upstream, InProcessServer(fake_settings(
            upstream.url, write_timeout_s=DEADLINE)) as srv:
        upstream.mode("slow_stream", delay_ms=0.2)  # 32,000 events of about 1.3 KB, paced
        body = chat_body(stream=True, n=16, logprobs=True, top_logprobs=20)
        with connect(srv, rcvbuf=4096) as sock:
            sock.sendall(request(json.dumps(body).encode()))
            deadline = time.monotonic() + 120
            while not srv.guard.timeouts["write"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert srv.guard.timeouts["write"] == 1
            deadline = time.monotonic() + SLACK
            while upstream.stats()["cancelled"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        stats = upstream.stats()
        assert stats["cancelled"] == 1 and stats["completed"] == 0, stats


# -- configuration -----------------------------------------------------------------------------

def test_flags_and_config_keys_set_the_limits(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import calibserve.server.cli

    seen: list[ServerSettings] = []
    monkeypatch.setattr(calibserve.server.cli, "run_server", seen.append)
    result = CliRunner().invoke(calibserve.server.cli.app, [
        "serve", "--upstream", "http://127.0.0.1:1", "--served-model-name", "m",
        "--header-timeout", "2.5", "--body-timeout", "7", "--keep-alive-timeout", "3",
        "--write-timeout", "9", "--max-connections", "42"])
    assert result.exit_code == 0, result.output
    assert ConnectionLimits.from_settings(seen[0]) == ConnectionLimits(2.5, 7, 3, 9, 42)
    config = tmp_path / "serve.yaml"
    config.write_text("header_timeout_s: 4\nmax_connections: 5\n"
                      "models: [{name: m, upstreams: ['http://127.0.0.1:1']}]\n")
    from_yaml = settings_from_cli(config=config, body_timeout=11)  # a flag over the file
    assert (from_yaml.header_timeout_s, from_yaml.body_timeout_s,
            from_yaml.max_connections) == (4, 11, 5)


def test_defaults_are_bounded_and_the_cap_follows_the_open_file_limit() -> None:
    limits = ConnectionLimits.from_settings(ServerSettings())
    assert 0 < limits.header_timeout_s <= 60 and 0 < limits.body_timeout_s <= 60
    assert 0 < limits.keep_alive_timeout_s <= 75 and 0 < limits.write_timeout_s <= 60
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert limits.max_connections == default_max_connections()
    assert 16 <= limits.max_connections <= 10_000
    assert soft == resource.RLIM_INFINITY or limits.max_connections <= max(16, soft - 256)


@pytest.mark.parametrize("flag", [{"header_timeout": 0}, {"body_timeout": -1},
                                  {"write_timeout": 0.0}, {"max_connections": 0}])
def test_bad_limits_are_usage_errors(flag: dict[str, float]) -> None:
    with pytest.raises(typer.BadParameter):
        settings_from_cli(upstream=["http://127.0.0.1:1"], served_model_name="m",
                          **flag)  # type: ignore[arg-type]


class _Transport:
    """A transport whose peer stopped reading: `pending` bytes stay unsent."""

    def __init__(self, pending: int) -> None:
        self.pending = pending
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return self.pending


@pytest.mark.parametrize("pending", [0, 4096])
def test_a_close_that_leaves_bytes_unsent_is_reported(pending: int) -> None:
    import asyncio

    from calibserve.server.connections import _BoundedWrites

    reported: list[bool] = []
    loop = asyncio.new_event_loop()
    try:
        raw = _Transport(pending)
        writes = _BoundedWrites(raw, loop, lambda: reported.append(True))  # type: ignore[arg-type]
        writes.write(b"tail of a response")
        writes.close()
    finally:
        loop.close()
    assert raw.written == [b"tail of a response"] and raw.closed
    assert reported == ([True] if pending else [])

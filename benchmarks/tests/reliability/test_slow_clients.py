"""Slow clients (a fast subset of benchmarks/reliability/slow_clients.py): the whole attack run
against `calibserve serve` over the FAKE upstream with short deadlines, and the hostile battery's
idle attack reporting what was held and for how long."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.reliability.hostile import attack_idle
from benchmarks.reliability.slow_clients import SLACK_S, run
from calibserve.testing.fake_upstream import FakeUpstream
from calibserve.testing.servers import InProcessServer, fake_settings

DEADLINE = 1.5


def test_every_slow_client_is_closed_within_its_deadline() -> None:
    result = run(fake=True, model_dir=Path("."), half=200, rate=400, bodies=20, readers=1,
                 idles=50, limits={"header_timeout": DEADLINE, "body_timeout": DEADLINE,
                                   "keep_alive_timeout": None, "write_timeout": DEADLINE},
                 max_connections=None, progress=lambda _: None)
    phases = {p["attack"]: p for p in result["phases"]}
    assert phases["half-sent headers"]["answers"] == {"408": 200}
    assert phases["body that stops"]["answers"] == {"408": 20}
    assert phases["reader that never reads"]["answers"] == {"reset": 1}
    assert phases["nothing sent"]["answers"] == {"closed": 50}
    for phase in result["phases"]:
        assert phase["within_bound"] == phase["count"], phase["line"]
        assert phase["held_max_s"] <= phase["deadline_s"] + SLACK_S
        assert phase["probes"]["failed"] == 0, phase["probes"]
    assert phases["half-sent headers"]["server"]["timeouts"]["header"] == 200
    assert phases["body that stops"]["server"]["timeouts"]["body"] == 20
    assert phases["reader that never reads"]["server"]["timeouts"]["write"] == 1
    # The server held the connections (its client sockets peaked), then let every one go.
    assert phases["half-sent headers"]["server"]["client_sockets_peak"] >= 100
    assert result["after"]["client_sockets"] <= result["baseline"]["client_sockets"]
    assert result["after"]["fds"] <= result["baseline"]["fds"]
    assert result["long_stream"]["bytes"] > 4 * 2**20  # more than the socket buffers hold


@pytest.fixture(scope="module")
def short_deadlines() -> Iterator[InProcessServer]:
    with FakeUpstream() as fake, InProcessServer(fake_settings(
            fake.url, header_timeout_s=DEADLINE)) as srv:
        yield srv


def test_the_hostile_report_says_what_was_held_and_for_how_long(
        short_deadlines: InProcessServer) -> None:
    v = attack_idle(short_deadlines.url, 100, DEADLINE + 10,
                    b"POST /v1/chat/completions HTTP/1.1\r\n", "100 half-sent", None, DEADLINE)
    assert v.ok, v
    assert v.extra["answers"] == {"408": 100} and v.extra["closed_by_server"] == 100
    assert DEADLINE * 0.8 <= v.extra["held_median_s"] <= v.extra["held_max_s"] \
        <= DEADLINE + SLACK_S
    assert "held" in v.outcome and "100/100 closed within" in v.outcome

"""Feedback abuse: rejected with the documented status, counted, calibration counters untouched."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from benchmarks.reliability.feedback_abuse import run_abuse
from calibserve.testing.checks import metric_sum, scrape
from calibserve.testing.fake_upstream import FakeUpstream
from calibserve.testing.servers import InProcessServer

VALIDATION_CHECK = "validation rejections counted as malformed"


@pytest.fixture(scope="module")
def abuse(rel_server: InProcessServer, rel_fake: FakeUpstream) -> dict[str, Any]:
    rel_fake.reset()
    return run_abuse(rel_server.url, flood=400, concurrency=16)


def test_every_attack_rejected_with_documented_status(abuse: dict[str, Any]) -> None:
    bad = [a for a in abuse["attacks"] if not a["ok"]]
    assert bad == []


@pytest.mark.parametrize("check", [
    "attacks never moved calibration counters",
    "honest feedback moved samples by exactly 3",
    "flood never moved calibration counters",
    "flood all rejected",
    "flood counted",
    "every semantic rejection counted",
    "server answered /health during the flood",
])
def test_abuse_invariant(abuse: dict[str, Any], check: str) -> None:
    assert abuse["checks"][check], abuse


def test_validation_rejections_are_counted(rel_server: InProcessServer) -> None:
    before = metric_sum(scrape(rel_server.url), "calibserve_feedback_total", outcome="malformed")
    r = httpx.post(f"{rel_server.url}/v1/feedback", json={"id": 12345, "correct": True},
                   timeout=10)
    assert r.status_code == 400
    after = metric_sum(scrape(rel_server.url), "calibserve_feedback_total", outcome="malformed")
    assert after - before == 1

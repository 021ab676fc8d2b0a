"""Fixtures for the reliability subset: the recording FAKE upstream and calibserve in front of it.

One fake and one in-process calibserve per session: the fuzz, feedback and hostile checks share
them (each test resets the fake's mode), so the subset stays well inside its time budget. The
server serves CASCADE_MODEL beside FAKE_MODEL (a route of three tiers on the same fake, the
middle tier judged by its own threshold), which the fuzz run steers requests to as well.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.reliability.harness import with_cascade
from calibserve.testing.fake_upstream import FakeUpstream
from calibserve.testing.servers import InProcessServer, fake_settings


@pytest.fixture(scope="session")
def rel_fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="session")
def rel_server(rel_fake: FakeUpstream) -> Iterator[InProcessServer]:
    with InProcessServer(with_cascade(fake_settings(rel_fake.url), rel_fake.url)) as server:
        yield server


@pytest.fixture
def fake(rel_fake: FakeUpstream) -> Iterator[FakeUpstream]:
    rel_fake.reset()
    yield rel_fake
    rel_fake.reset()

"""`free_port` picks below the kernel's ephemeral range, so a port picked now and bound a minute
later (calibserve binds after its engine starts) cannot have been handed to a vLLM socket or a
client connection in between."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from calibserve.server import ports


def test_a_picked_port_is_free_and_outside_the_ephemeral_range() -> None:
    picked = {ports.free_port() for _ in range(20)}
    assert all(ports.LOWEST <= p < ports.ephemeral_low() for p in picked)
    assert len(picked) > 1  # a random start: concurrent pickers rarely meet
    port = picked.pop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # raises if it was not free


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(ports, "LOWEST", busy)
        monkeypatch.setattr(ports, "ephemeral_low", lambda: busy + 200)
        monkeypatch.setattr(ports.random, "randrange", lambda n: 0)  # try `busy` first
        assert busy < ports.free_port() < busy + 200


def test_an_unreadable_range_falls_back_to_linux_default(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE_FILE", tmp_path / "missing")
    assert ports.ephemeral_low() == 32768
    garbled = tmp_path / "range"
    garbled.write_text("not numbers\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE_FILE", garbled)
    assert ports.ephemeral_low() == 32768

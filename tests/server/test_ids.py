"""Signed response ids and the replay guard."""

from __future__ import annotations

import pytest

from calibserve.server.ids import ForgedId, MalformedId, ReplayGuard, ResponseIdSigner


def test_roundtrip_keeps_prefix_model_and_exact_scores() -> None:
    signer = ResponseIdSigner("k1")
    score = 0.1234567890123456
    rid = signer.issue("chatcmpl-", "merged", [score, 0.5], [0.9, 0.25], now=1000)
    assert rid.startswith("chatcmpl-")
    claims = signer.verify(rid)
    assert claims.model == "merged"
    assert claims.scores == (score, 0.5)  # exact: counters record what was served
    assert claims.raws == (0.9, 0.25)
    assert claims.issued_at == 1000
    assert signer.verify(signer.issue("cmpl-", "m", [0.3], [0.3])).prefix == "cmpl-"


def test_ids_are_unique_for_identical_answers() -> None:
    signer = ResponseIdSigner("k1")
    assert signer.issue("cmpl-", "m", [0.5], [0.5], now=1) != signer.issue(
        "cmpl-", "m", [0.5], [0.5], now=1)


@pytest.mark.parametrize("bad", [
    "", "chatcmpl-", "chatcmpl-abc", "resp-abc.def", "chatcmpl-abc.", "chatcmpl-.abc",
    "chatcmpl-a$b.c", 12, None, "chatcmpl-" + "a" * 5000 + ".x",
])
def test_malformed(bad: object) -> None:
    with pytest.raises(MalformedId):
        ResponseIdSigner("k").verify(bad)


def test_forged_wrong_key_truncated_and_tampered() -> None:
    good = ResponseIdSigner("k1").issue("chatcmpl-", "m", [0.9], [0.9])
    with pytest.raises(ForgedId):
        ResponseIdSigner("other").verify(good)
    payload, tag = good[len("chatcmpl-"):].split(".")
    tampered = ResponseIdSigner("k1").issue("chatcmpl-", "m", [0.1], [0.1])
    t_payload = tampered[len("chatcmpl-"):].split(".")[0]
    with pytest.raises(ForgedId):  # someone else's payload with this signature
        ResponseIdSigner("k1").verify(f"chatcmpl-{t_payload}.{tag}")
    with pytest.raises(ForgedId):  # the prefix is signed too
        ResponseIdSigner("k1").verify(f"cmpl-{payload}.{tag}")
    with pytest.raises((MalformedId, ForgedId)):
        ResponseIdSigner("k1").verify(good[:-3])


def test_replay_guard_capacity_raises_horizon() -> None:
    guard = ReplayGuard(capacity=2, ttl_s=100)
    guard.add("a", issued_at=10, now=20)
    guard.add("b", issued_at=11, now=20)
    guard.add("c", issued_at=12, now=20)  # evicts "a" (issued at 10)
    assert len(guard) == 2
    assert not guard.seen("a")
    assert guard.expired(10, now=20)  # so "a" can never be replayed
    assert not guard.expired(11, now=20)


def test_replay_guard_ttl() -> None:
    guard = ReplayGuard(capacity=10, ttl_s=5)
    assert guard.expired(issued_at=0, now=10)
    assert not guard.expired(issued_at=6, now=10)
    guard.add("x", issued_at=6, now=10)
    guard.add("y", issued_at=20, now=20)  # "x" is past its TTL: dropped, still refused
    assert not guard.seen("x") and guard.expired(6, now=20)

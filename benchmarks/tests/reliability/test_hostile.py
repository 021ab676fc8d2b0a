"""Hostile clients (a fast subset): oversized bodies, disconnects, invalid text, idle hordes; and
the same against CASCADE_MODEL's route of three tiers (each over a FAKE of its own): a client
leaving while on the middle or the expert tier, bodies and huge asks naming the route."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from benchmarks.reliability.harness import CASCADE_MODEL
from benchmarks.reliability.hostile import (
    BOTH,
    TIERS,
    Target,
    attack_bodies,
    attack_cascade_disconnects,
    attack_disconnects,
    attack_huge_asks,
    attack_idle,
    attack_model_paths,
    plan,
    probe_problem,
    raw_exchange,
    request_bytes,
    route_disconnect_problems,
    route_expected,
    target,
)
from calibserve.testing.checks import chat_body, is_openai_error
from calibserve.testing.fake_upstream import FAKE_MODEL, FakeUpstream
from calibserve.testing.servers import InProcessServer


def _serving(url: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=10)
    assert r.status_code == 200 and "confidence" in r.json()["choices"][0]


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_body_413_and_never_forwarded(rel_server: InProcessServer, fake: FakeUpstream,
                                                chunked: bool) -> None:
    limit = rel_server.runtime.settings.max_body_bytes
    big = json.dumps({**chat_body(), "messages": [{"role": "user", "content": "x" * limit}]})
    status, buf = raw_exchange(rel_server.url, request_bytes(big.encode(), chunked=chunked))
    assert status == 413
    assert is_openai_error(json.loads(buf.partition(b"\r\n\r\n")[2]))
    assert fake.stats()["largest_body"] < limit
    _serving(rel_server.url)


@pytest.mark.parametrize("raw", [
    b'{"model": "fake-model", "messages": [{"role": "user", "content": "\xff\xfe\xc3\x28"}]}',
    b'{"model": "fake-model", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b"null",
])
def test_invalid_bodies_400(rel_server: InProcessServer, raw: bytes) -> None:
    status, buf = raw_exchange(rel_server.url, request_bytes(raw))
    assert status == 400
    assert is_openai_error(json.loads(buf.partition(b"\r\n\r\n")[2]))
    _serving(rel_server.url)


def test_lone_surrogate_is_not_a_500(rel_server: InProcessServer) -> None:
    r = httpx.post(f"{rel_server.url}/v1/chat/completions", timeout=10,
                   content=b'{"model": "fake-model", "messages": [{"role": "user", '
                           b'"content": "\\ud800"}]}', headers={"content-type": "application/json"})
    assert r.status_code in (200, 400), r.text


@pytest.mark.parametrize("stream", [False, True])
def test_nan_in_passthrough_field_is_400(rel_server: InProcessServer, stream: bool) -> None:
    body = json.dumps({**chat_body(stream=stream), "top_k": 1}).replace('"top_k": 1',
                                                                        '"top_k": NaN')
    r = httpx.post(f"{rel_server.url}/v1/chat/completions", content=body.encode(), timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("huge", [{"n": 10**9}, {"n": 17}, {"top_logprobs": 10**6,
                                                           "logprobs": True}])
def test_huge_asks_400(rel_server: InProcessServer, huge: dict[str, object]) -> None:
    r = httpx.post(f"{rel_server.url}/v1/chat/completions", json={**chat_body(), **huge},
                   timeout=10)
    assert r.status_code == 400 and is_openai_error(r.json())


def test_hostile_model_paths_are_clean(rel_server: InProcessServer) -> None:
    verdicts = attack_model_paths(rel_server.url)
    assert all(v.ok for v in verdicts), [v for v in verdicts if not v.ok]


def test_client_disconnect_cancels_upstream(rel_server: InProcessServer,
                                            fake: FakeUpstream) -> None:
    verdicts = attack_disconnects(rel_server.url, fake, rounds=2)
    for v in verdicts:
        assert v.clean, v
        assert v.probes_failed == 0, v
        assert v.extra.get("cancel_after_ms_max", 1e9) < 2000, v


def test_idle_connections_do_not_stop_service(rel_server: InProcessServer) -> None:
    v = attack_idle(rel_server.url, 300, 2.0, b"", "300 idle", None)
    assert v.extra["opened"] >= 300
    assert v.probes_ok > 0 and v.probes_failed == 0, v
    assert FAKE_MODEL in httpx.get(f"{rel_server.url}/v1/models", timeout=10).text


# --- CASCADE_MODEL: primary -> middle -> expert, each tier over a FAKE of its own -------------

@pytest.fixture(scope="module")
def cascade() -> Iterator[Target]:
    """What `python -m benchmarks.reliability.hostile` attacks, in this process."""
    with target(in_process=True) as t:
        yield t


def test_the_run_attacks_the_cascade_and_probes_it(cascade: Target) -> None:
    steps = [name for name, _ in plan(cascade.url, cascade.fake, None, cascade.max_n, 1, 1, 1, 1,
                                      route=cascade.route)]
    for step in ("bodies", "huge asks", "disconnects"):
        assert f"{CASCADE_MODEL} {step}" in steps
    one_tier = plan(cascade.url, cascade.fake, None, cascade.max_n, 1, 1, 1, 1)
    assert not [name for name, _ in one_tier if CASCADE_MODEL in name]
    r = httpx.post(f"{cascade.url}/v1/chat/completions", json=chat_body(model=CASCADE_MODEL),
                   timeout=10)
    assert probe_problem(r, CASCADE_MODEL) is None  # the route walked: the expert served it
    assert r.json()["calibserve"]["tiers_tried"] == [CASCADE_MODEL, "middle", "expert"]


def test_a_probe_the_expert_did_not_serve_fails() -> None:
    answer = {"choices": [{"confidence": 0.7}], "calibserve": {"served_by": CASCADE_MODEL}}
    r = httpx.Response(200, json=answer)
    assert probe_problem(r, CASCADE_MODEL) == f"served by {CASCADE_MODEL}, not the expert"
    assert probe_problem(r, FAKE_MODEL) is None


@pytest.mark.parametrize(("tier", "asked", "cancelled", "wrong"), [
    ("middle", {"primary": 2, "middle": 2, "expert": 0}, 2, []),
    ("expert", {"primary": 2, "middle": 2, "expert": 2}, 2, []),
    # a later tier asked once the client had gone
    ("middle", {"primary": 2, "middle": 2, "expert": 1}, 2,
     ["expert asked 1 after the client left"]),
    # the tier in flight never saw the request cancelled
    ("middle", {"primary": 2, "middle": 2, "expert": 0}, 1, ["middle cancelled 1/2"]),
    # a client left before its request reached the tier
    ("expert", {"primary": 2, "middle": 2, "expert": 1}, 1,
     ["expert asked 1/2", "expert cancelled 1/2"]),
])
def test_disconnect_verdict_on_the_route(tier: str, asked: dict[str, int], cancelled: int,
                                         wrong: list[str]) -> None:
    assert route_disconnect_problems(tier, 2, asked, cancelled, dict.fromkeys(TIERS, 0)) == wrong
    assert route_disconnect_problems(tier, 0, dict.fromkeys(TIERS, 0), 0,
                                     {"primary": 0, "middle": 1, "expert": 0}) \
        == ["middle still has 1 in flight"]


def test_client_leaving_mid_route_cancels_that_tier_and_asks_no_later_one(
        cascade: Target) -> None:
    verdicts = attack_cascade_disconnects(cascade.url, cascade.route, rounds=2)
    assert {v.attack for v in verdicts} == {
        f"{CASCADE_MODEL}: disconnect while on the {tier} ({how})"
        for tier in ("middle", "expert") for how in ("streamed", "non-stream")}
    for v in verdicts:
        assert v.ok and v.model == CASCADE_MODEL, v
        assert v.extra["reached_tier"] == 2, v
        assert v.extra.get("cancel_after_ms_max", 1e9) < 2000, v
        on_middle = "on the middle" in v.attack
        assert v.extra["tiers_asked"] == {"primary": 2, "middle": 2,
                                          "expert": 0 if on_middle else 2}, v
        assert v.extra["probes_by_model"][CASCADE_MODEL] == 1, v  # served by the expert after
        if "expert (streamed)" in v.attack:
            assert v.extra["saw_first_chunk"] == 2, v


def test_bodies_and_huge_asks_naming_the_cascade(cascade: Target) -> None:
    limit = 4 * 1024 * 1024
    verdicts = (attack_bodies(cascade.url, cascade.fake, limit, route=cascade.route, probe=BOTH)
                + attack_huge_asks(cascade.url, cascade.max_n, route=cascade.route, probe=BOTH))
    by_name = {v.attack.removeprefix(f"{CASCADE_MODEL}: "): v for v in verdicts}
    assert all(v.ok for v in verdicts), [v for v in verdicts if not v.ok]
    for v in verdicts:
        assert v.model == CASCADE_MODEL and v.attack.startswith(f"{CASCADE_MODEL}: "), v
        assert v.extra["probes_by_model"][CASCADE_MODEL] >= 1, v  # the route probed meanwhile
    none = dict.fromkeys(TIERS, 0)
    for name in ("over the limit (content-length)", "over the limit (chunked, no length)"):
        assert by_name[name].outcome == "413 shaped" and by_name[name].extra["tiers_asked"] == none
        assert max(by_name[name].extra["largest_body_upstream"].values()) <= limit
    assert by_name["n = 10**9"].extra["tiers_asked"] == none
    for name in ("n = -1", "top_logprobs = 10**6"):  # the engine refuses: from the primary alone
        v = by_name[name]
        assert v.outcome.startswith("400") and v.extra.get("engine_error"), v
        assert v.extra["tiers_asked"] == route_expected(400, engine_error=True)
    # What calibserve and the engine accept walks the whole route, each tier asked once.
    assert by_name["UTF-16 body"].extra["tiers_asked"] == dict.fromkeys(TIERS, 1)
    assert by_name["max_tokens = 2**70 (past int64)"].extra["tiers_asked"] == route_expected(
        int(by_name["max_tokens = 2**70 (past int64)"].outcome[:3]), engine_error=False)

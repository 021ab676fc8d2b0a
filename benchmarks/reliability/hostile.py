"""Hostile clients: oversized and invalid bodies, slow senders, disconnects, idle hordes, huge asks,
hostile model-list paths; against a model of one tier and against a route of three.

Each attack runs against calibserve (a subprocess, over recording FAKE upstreams) serving two
models: FAKE_MODEL (one tier) and CASCADE_MODEL (harness.py: primary -> middle -> expert, every
answer of the primary and of the middle tier judged below its threshold and sent on, so each
request takes both hops), each of its tiers over a FAKE upstream of its own, so that what each
tier was asked is seen apart. A prober sends ordinary chat requests to both models in turn (a
probe of CASCADE_MODEL counts only if the expert served it: the whole route walked); every attack
sees at least one probe of each. The verdict for each attack is:

- the attacker got a clean answer (an OpenAI-shaped 4xx) or a clean close, never a 5xx the
  server caused and never a hang past a bounded wait;
- the server kept serving others (every probe during the attack succeeded; latency reported);
- for client disconnects: the upstream saw the request cancelled (the fake counts connections
  closed under an unfinished answer);
- for CASCADE_MODEL (attacks named `fake-cascade: ...`):
  - a client that leaves while its request is on the middle or the expert tier, streamed or not
    (that tier's FAKE made slow; the client goes once the request has reached it, which in stream
    `buffer` mode is before calibserve has sent a byte, the judged tiers' streams being held):
    each tier before it asked once, the tier in flight saw its request cancelled, no tier after it
    was ever asked, nothing left in flight, and the route served a probe by the expert after;
    the prober asks FAKE_MODEL alone meanwhile (the route's FAKEs see the attacker's requests
    only);
  - oversized and invalid bodies and huge asks (`n`, `max_tokens`, `top_logprobs`, ...) naming
    it: a clean 4xx from calibserve with no tier asked (an oversized body reaching none); an
    error the engine (the FAKE) answers passed through as it came (OpenAI's shape, marked
    `x-calibserve-error-source: engine`) from the primary, no later tier asked; an answer
    walked the whole route, each tier asked once (the prober's own probes subtracted);
- for idle connections, half-sent requests and slow senders: what the server held and for how
  long (each connection from its connect to the server's close: median, p99, max), and clean
  only if every one was closed within the server's header deadline + 5 s (server/
  connections.py; slow_clients.py runs these and the rest of the slow clients with the engine).

Everything is bounded: slow senders and idle connections are capped in count and seconds, and
idle connections respect this process's open-file limit.

    python -m benchmarks.reliability.hostile [--idle 2000] [--slow 100] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import resource
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.reliability.harness import (
    CASCADE_MODEL,
    FAKE_MODEL,
    CalibserveProcess,
    FakeUpstream,
    InProcessServer,
    Percentiles,
    cascade_model,
    chat_body,
    error_shape_ok,
    fake_settings,
    is_openai_error,
    write_result,
)
from benchmarks.reliability.slow_clients import SLACK_S, Phase, deadlines, hold_connection, paced


@dataclass
class Verdict:
    attack: str
    outcome: str  # what the attacker saw
    clean: bool  # a clean answer or close
    probes_ok: int = 0
    probes_failed: int = 0
    probe_p99_ms: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)
    model: str = FAKE_MODEL  # the model the attack names

    @property
    def ok(self) -> bool:
        return self.clean and self.probes_failed == 0


TIERS = ("primary", "middle", "expert")  # CASCADE_MODEL's route, in the order it is walked
ONE_TIER = (FAKE_MODEL,)
BOTH = (FAKE_MODEL, CASCADE_MODEL)


@dataclass
class Route:
    """CASCADE_MODEL's three tiers, each over a FAKE upstream of its own: what each tier was asked,
    and what it saw cancelled, is seen apart. The FAKEs are read and set over one kept-alive
    client (a fresh one per call costs more than the requests the attacks time)."""

    primary: FakeUpstream
    middle: FakeUpstream
    expert: FakeUpstream
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=5), repr=False)

    def fakes(self) -> dict[str, FakeUpstream]:
        return {"primary": self.primary, "middle": self.middle, "expert": self.expert}

    def model(self) -> dict[str, Any]:
        """The `models` entry serving CASCADE_MODEL over these FAKEs."""
        return cascade_model(self.primary.url, self.middle.url, self.expert.url)

    def stats(self, tier: str) -> dict[str, Any]:
        stats: dict[str, Any] = self.client.get(f"{self.fakes()[tier].url}/fake/stats").json()
        return stats

    def stat(self, key: str) -> dict[str, int]:
        return {tier: int(self.stats(tier)[key]) for tier in TIERS}

    def asked(self) -> dict[str, int]:
        """Requests each tier has received on /v1/ (answered, abandoned or still running)."""
        out = {}
        for tier in TIERS:
            s = self.stats(tier)
            out[tier] = int(s["completed"] + s["cancelled"] + s["in_flight"])
        return out

    def mode(self, tier: str, mode: str, delay_ms: float = 0) -> None:
        self.client.post(f"{self.fakes()[tier].url}/fake/mode",
                         json={"mode": mode, "delay_ms": delay_ms})

    def reset(self) -> None:
        for tier, fake in self.fakes().items():
            self.client.post(f"{fake.url}/fake/reset")
            self.mode(tier, "ok")


@contextlib.contextmanager
def route_over_fakes() -> Iterator[Route]:
    """Three FAKE upstreams for CASCADE_MODEL's tiers (stopped on exit)."""
    with FakeUpstream() as primary, FakeUpstream() as middle, FakeUpstream() as expert:
        route = Route(primary, middle, expert)
        try:
            yield route
        finally:
            route.client.close()


def probe_problem(r: httpx.Response, model: str) -> str | None:
    """Why a probe's answer is not an ordinary one (None: it is). A probe of CASCADE_MODEL must
    have walked the whole route: answered by the expert."""
    if r.status_code != 200:
        return f"status {r.status_code}"
    try:
        body = r.json()
        choice = body["choices"][0]
    except (ValueError, LookupError, TypeError):
        return "200 but not a chat answer"
    if "confidence" not in choice:
        return "no confidence"
    if model == CASCADE_MODEL:
        served_by = (body.get("calibserve") or {}).get("served_by")
        if served_by != "expert":
            return f"served by {served_by}, not the expert"
    return None


class Prober:
    """Sends ordinary chat requests in a thread while an attack runs: a round asks each of
    `models` in turn, and there is at least one round, however short the attack."""

    def __init__(self, url: str, interval: float = 0.05,
                 models: Sequence[str] = ONE_TIER) -> None:
        self.url = url
        self.interval = interval
        self.models = tuple(models)
        self.ok: list[float] = []
        self.ok_by_model: dict[str, int] = dict.fromkeys(self.models, 0)
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def probe(self, client: httpx.Client, model: str) -> None:
        """One probe of `model`, counted."""
        t0 = time.perf_counter()
        try:
            r = client.post("/v1/chat/completions", json=chat_body(model=model))
            problem = probe_problem(r, model)
        except httpx.HTTPError as exc:
            problem = repr(exc)[:120]
        if problem is None:
            self.ok.append(time.perf_counter() - t0)
            self.ok_by_model[model] = self.ok_by_model.get(model, 0) + 1
        else:
            self.failed.append(problem if model == FAKE_MODEL else f"{model}: {problem}")

    def probe_once(self, model: str) -> None:
        """One more probe of `model`, from the caller's thread (the prober stopped)."""
        with httpx.Client(base_url=self.url, timeout=10) as client:
            self.probe(client, model)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while True:
                for model in self.models:
                    self.probe(client, model)
                if self._stop.wait(self.interval):
                    break

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def fill(self, v: Verdict) -> Verdict:
        v.probes_ok, v.probes_failed = len(self.ok), len(self.failed)
        v.probe_p99_ms = Percentiles.of(self.ok).p99_ms
        v.extra["probes_by_model"] = dict(self.ok_by_model)
        if self.failed:
            v.extra["probe_failures"] = self.failed[:3]
        return v


def _host_port(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1]
    host, port = rest.rsplit(":", 1)
    return host, int(port)


def raw_exchange(url: str, data: bytes, timeout: float = 10.0, pace: float = 0.0,
                 chunk: int = 0) -> tuple[int | None, bytes]:
    """Send raw bytes (optionally `chunk` bytes every `pace` s); read until close or timeout.

    Returns (HTTP status or None, response bytes); an empty response means a clean close.
    """
    host, port = _host_port(url)
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            if chunk and pace:
                for i in range(0, len(data), chunk):
                    s.sendall(data[i:i + chunk])
                    time.sleep(pace)
            else:
                s.sendall(data)
        except OSError:
            pass  # the server may close on us mid-send (e.g. 413): read what it said
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                part = s.recv(65536)
            except (TimeoutError, OSError):
                break
            if not part:
                break
            buf += part
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                length = _content_length(head)
                if length is not None and len(body) >= length:
                    break
    status = None
    if buf.startswith(b"HTTP/1."):
        with contextlib.suppress(ValueError, IndexError):
            status = int(buf.split(b" ", 2)[1])
    return status, buf


def _content_length(head: bytes) -> int | None:
    value = _header(head, b"content-length")
    if value is not None:
        with contextlib.suppress(ValueError):
            return int(value)
    return None


def _body_of(buf: bytes) -> Any:
    _, _, body = buf.partition(b"\r\n\r\n")
    try:
        return json.loads(body)
    except ValueError:
        return None


def request_bytes(body: bytes, path: str = "/v1/chat/completions",
                  headers: dict[str, str] | None = None, chunked: bool = False) -> bytes:
    hdrs = {"host": "127.0.0.1", "content-type": "application/json", "connection": "close"}
    hdrs.update(headers or {})
    if chunked:
        hdrs["transfer-encoding"] = "chunked"
        size = 65536
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                           for i in range(0, len(body), size)) + b"0\r\n\r\n"
    else:
        hdrs.setdefault("content-length", str(len(body)))
        payload = body
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    return head.encode() + b"\r\n" + payload


def _clean(status: int | None, buf: bytes, allowed: tuple[int, ...], protocol: bool = False
           ) -> tuple[bool, str]:
    if status is None:
        return (not buf), ("closed" if not buf else f"non-HTTP reply {buf[:60]!r}")
    body = _body_of(buf)
    # A request uvicorn cannot parse as HTTP never reaches the app: a plain-text 400 and a close
    # is the clean answer there.
    shaped = is_openai_error(body) if status >= 400 and not protocol else True
    return status in allowed and shaped, f"{status} {'shaped' if shaped else 'NOT shaped'}"


def _header(buf: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (lower case) in a raw response (or its head alone)."""
    head, _, _ = buf.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


# --- what CASCADE_MODEL's tiers must have been asked ------------------------------------------

def route_expected(status: int | None, engine_error: bool) -> dict[str, int]:
    """What each tier must have been asked for one request that got `status`: the whole route for
    an answer; the primary alone for an error the engine answered (passed through, never sent on
    to a later tier); no tier for what calibserve refused itself (or a close)."""
    if status is not None and status < 400:
        return dict.fromkeys(TIERS, 1)
    if engine_error:
        return {"primary": 1, "middle": 0, "expert": 0}
    return dict.fromkeys(TIERS, 0)


def asked_beyond_probes(route: Route, before: dict[str, int], prober: Prober) -> dict[str, int]:
    """What each tier was asked since `before` beyond the prober's own probes of CASCADE_MODEL
    (each one that succeeded asked every tier once; read once the prober has stopped)."""
    after = route.asked()
    probes = prober.ok_by_model.get(CASCADE_MODEL, 0)
    return {tier: after[tier] - before[tier] - probes for tier in TIERS}


def _judge_route(v: Verdict, route: Route, before: dict[str, int], prober: Prober,
                 status: int | None, engine_error: bool) -> None:
    asked = asked_beyond_probes(route, before, prober)
    expected = route_expected(status, engine_error)
    v.extra["tiers_asked"] = asked
    if engine_error:
        v.extra["engine_error"] = True
    if asked != expected:
        v.clean = False
        v.extra["tiers_expected"] = expected


# --- attacks ------------------------------------------------------------------------------------

def _body_cases(model: str, limit: int) -> list[tuple[str, bytes, tuple[int, ...], bool]]:
    """(name, request bytes, statuses allowed, whether the body names `model`)."""
    m = json.dumps(model).encode()
    hi = b'"messages": [{"role": "user", "content": "hi"}]'
    base = chat_body(model=model)
    big = json.dumps({**base, "messages": [{"role": "user",
                                            "content": "x" * (limit + 10)}]}).encode()
    deep = b'{"model": ' + m + b', "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    return [
        ("over the limit (content-length)", request_bytes(big), (413,), True),
        ("over the limit (chunked, no length)", request_bytes(big, chunked=True), (413,), True),
        ("lying content-length (says 100, sends more)",
         request_bytes(big, headers={"content-length": "100"}), (400,), True),
        ("content-length huge, body small",
         request_bytes(b"{}", headers={"content-length": str(10**12)}), (413,), False),
        ("invalid UTF-8 in a string",
         request_bytes(b'{"model": ' + m + b', "messages": [{"role": "user", '
                       b'"content": "\xff\xfe\xc3\x28"}]}'), (400,), True),
        ("invalid UTF-8 in model name",
         request_bytes(b'{"model": "\xc0\xaf", ' + hi + b"}"), (400,), False),
        # json.loads detects UTF-16/32 by itself: accepting it is lenient, not wrong.
        ("UTF-16 body", request_bytes(json.dumps(base).encode("utf-16")), (200, 400), True),
        ("lone surrogate escape",
         request_bytes(b'{"model": ' + m + b', "messages": [{"role": "user", '
                       b'"content": "\\ud800"}]}'), (200, 400), True),
        ("deeply nested JSON (50k levels)", request_bytes(deep), (400,), True),
        ("empty body", request_bytes(b""), (400,), False),
        ("text/plain body", request_bytes(json.dumps(base).encode(),
                                          headers={"content-type": "text/plain"}),
         (200, 400, 415), True),
        ("JSON null", request_bytes(b"null"), (400,), False),
        ("NaN temperature", request_bytes(b'{"model": ' + m + b", " + hi +
                                          b', "temperature": NaN}'), (400,), True),
        ("NaN in a pass-through field",
         request_bytes(b'{"model": ' + m + b", " + hi + b', "top_k": NaN}'), (400,), True),
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64,
         (400,), False),
        ("header with invalid UTF-8",
         request_bytes(json.dumps(base).encode(), headers={"x-evil": "EVIL"})
         .replace(b"EVIL", b"\xff\xfe"), (200, 400), True),
    ]


def attack_bodies(url: str, fake: FakeUpstream, limit: int, route: Route | None = None,
                  probe: Sequence[str] = ONE_TIER) -> list[Verdict]:
    """Oversized, invalid UTF-8, deep nesting, wrong content type, garbage request lines. With
    `route`, the bodies that name a model name CASCADE_MODEL instead, and each tier's asks are
    checked (`route_expected`); an oversized body must reach no tier."""
    model = FAKE_MODEL if route is None else CASCADE_MODEL
    cases = [case for case in _body_cases(model, limit) if route is None or case[3]]
    out: list[Verdict] = []
    for name, data, allowed, _ in cases:
        before = fake.stats()["largest_body"]
        asked_before = route.asked() if route is not None else {}
        largest_before = route.stat("largest_body") if route is not None else {}
        with Prober(url, models=probe) as prober:
            status, buf = raw_exchange(url, data, timeout=20)
        clean, outcome = _clean(status, buf, allowed, protocol=name.startswith("garbage"))
        v = prober.fill(Verdict(name if route is None else f"{CASCADE_MODEL}: {name}", outcome,
                                clean, model=model))
        if "limit" in name:
            # An oversized body must never reach the upstream.
            if route is None:
                v.extra["largest_body_upstream"] = fake.stats()["largest_body"]
                v.clean = v.clean and fake.stats()["largest_body"] <= max(before, limit)
            else:
                largest = route.stat("largest_body")
                v.extra["largest_body_upstream"] = largest
                v.clean = v.clean and all(largest[t] <= max(largest_before[t], limit)
                                          for t in TIERS)
        if route is not None:
            _judge_route(v, route, asked_before, prober, status,
                         _header(buf, b"x-calibserve-error-source") == b"engine")
        out.append(v)
    return out


def attack_huge_asks(url: str, max_n: int, route: Route | None = None,
                     probe: Sequence[str] = ONE_TIER) -> list[Verdict]:
    """Asks past every sane range. With `route`, they name CASCADE_MODEL, and each tier's asks are
    checked (`route_expected`): what the engine refuses must come back from the primary, as the
    engine said it, and go no further."""
    model = FAKE_MODEL if route is None else CASCADE_MODEL
    cases: list[tuple[str, dict[str, Any], tuple[int, ...]]] = [
        ("n = 10**9", chat_body(n=10**9), (400,)),
        (f"n = max_n + 1 ({max_n + 1})", chat_body(n=max_n + 1), (400,)),
        ("n = -1", chat_body(n=-1), (400,)),
        ("max_tokens = 10**12", chat_body(max_tokens=10**12), (200, 400)),
        ("max_tokens = 2**70 (past int64)", chat_body(max_tokens=2**70), (200, 400)),
        ("top_logprobs = 10**6", chat_body(logprobs=True, top_logprobs=10**6), (400,)),
        ("completions logprobs = 10**6",
         {"model": FAKE_MODEL, "prompt": "x", "logprobs": 10**6}, (400,)),
        ("responses top_logprobs = 10**6",
         {"model": FAKE_MODEL, "input": "x", "top_logprobs": 10**6,
          "include": ["message.output_text.logprobs"]}, (400,)),
        ("100k messages (about 3 MB)",
         {**chat_body(), "messages": [{"role": "user", "content": "hi"}] * 100_000}, (200, 400)),
        ("prompt of 500k token ids",
         {"model": FAKE_MODEL, "prompt": list(range(500_000))[:400_000], "max_tokens": 1},
         (200, 400, 413)),
    ]
    out: list[Verdict] = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for name, body, allowed in cases:
            body = {**body, "model": model}
            path = ("/v1/completions" if "prompt" in body else "/v1/responses" if "input" in body
                    else "/v1/chat/completions")
            asked_before = route.asked() if route is not None else {}
            with Prober(url, models=probe) as prober:
                t0 = time.perf_counter()
                r = client.post(path, json=body)
                took = time.perf_counter() - t0
            shaped = r.status_code < 400 or error_shape_ok(r)
            v = prober.fill(Verdict(name if route is None else f"{CASCADE_MODEL}: {name}",
                                    f"{r.status_code} in {took * 1000:.0f} ms",
                                    r.status_code in allowed and shaped, model=model))
            if route is not None:
                _judge_route(v, route, asked_before, prober, r.status_code,
                             r.headers.get("x-calibserve-error-source") == "engine")
            out.append(v)
    return out


def attack_model_paths(url: str, probe: Sequence[str] = ONE_TIER) -> list[Verdict]:
    """The model list's routes with hostile paths and bodies: a clean 404 (OpenAI's shape) for
    what names no served model, the list itself answered (never the body read into memory past
    the limit)."""
    cases: list[tuple[str, str, bytes | None, tuple[int, ...]]] = [
        ("model id of 8k characters", "/v1/models/" + "a" * 8000, None, (404,)),
        ("model id with encoded traversal", "/v1/models/%2e%2e%2f%2e%2e%2fetc%2fpasswd", None,
         (404,)),
        ("model id with a NUL", "/v1/models/%00", None, (404,)),
        ("model id with invalid UTF-8", "/v1/models/%ff%fe", None, (404,)),
        ("GET /v1/models with a 1 MB body", "/v1/models", b"x" * (1024 * 1024), (200, 413)),
    ]
    out: list[Verdict] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for name, path, content, allowed in cases:
            with Prober(url, models=probe) as prober:
                r = client.request("GET", path, content=content)
            shaped = r.status_code < 400 or error_shape_ok(r)
            out.append(prober.fill(Verdict(name, f"{r.status_code}",
                                           r.status_code in allowed and shaped)))
    return out


def _wait_for(cond: Callable[[], bool], timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def _above(stats: Callable[[], dict[str, Any]], key: str, than: int) -> Callable[[], bool]:
    """Is a FAKE's `key` count above `than` now? (a condition for `_wait_for`)"""
    return lambda: int(stats()[key]) > than


def attack_disconnects(url: str, fake: FakeUpstream, rounds: int = 5,
                       probe: Sequence[str] = ONE_TIER) -> list[Verdict]:
    """Clients that go away mid-stream or mid-wait: the upstream request must be cancelled."""
    out: list[Verdict] = []
    for stream in (True, False):
        fake.reset()
        fake.mode("slow_stream" if stream else "slow", delay_ms=300 if stream else 4000)
        cancel_times: list[float] = []
        saw_chunk = 0
        with Prober(url, interval=0.2, models=probe) as prober:
            for _ in range(rounds):
                before = fake.stats()["cancelled"]
                host, port = _host_port(url)
                body = json.dumps(chat_body(stream=stream)).encode()
                with socket.create_connection((host, port), timeout=10) as s:
                    s.sendall(request_bytes(body, headers={"connection": "keep-alive"}))
                    if stream:
                        data = s.recv(65536)  # headers and the first event(s)
                        saw_chunk += int(b"data: " in data or b"200 OK" in data)
                    else:
                        time.sleep(0.3)
                    t0 = time.monotonic()
                took = _wait_for(_above(fake.stats, "cancelled", before), 5.0)
                if took is not None:
                    cancel_times.append(time.monotonic() - t0)
        # The prober's own requests go through the same slow fake: let them finish first.
        _wait_for(lambda: fake.stats()["in_flight"] == 0, 10.0)
        stats = fake.stats()
        name = "disconnect mid-stream" if stream else "disconnect while waiting (non-stream)"
        v = Verdict(name, f"upstream cancelled {stats['cancelled']}/{rounds}",
                    stats["cancelled"] >= rounds and stats["in_flight"] == 0)
        if cancel_times:
            v.extra["cancel_after_ms_max"] = round(max(cancel_times) * 1000, 1)
        if stream:
            v.extra["saw_first_chunk"] = saw_chunk
        out.append(prober.fill(v))
        fake.mode("ok")
    return out


# Where a client leaves CASCADE_MODEL's route: (the tier in flight, streamed). That tier's FAKE is
# made slow; the tiers before it have answered and been judged by then (streamed, in `buffer`
# mode: held, so no byte has gone back yet), the tiers after it must never be asked.
CASCADE_DISCONNECTS: tuple[tuple[str, bool], ...] = (
    ("middle", False), ("middle", True), ("expert", False), ("expert", True))
SETTLE_S = 0.3  # after the last cancel: a later tier asked on a cancel would be asked by then


def route_disconnect_problems(tier: str, rounds: int, asked: dict[str, int], cancelled: int,
                              in_flight: dict[str, int]) -> list[str]:
    """What is wrong (nothing: clean) after `rounds` clients each left while on `tier`: every tier
    up to it asked once a round (so each request was on `tier` when its client went), `tier`
    saw every one cancelled, no later tier asked, nothing left in flight."""
    at = TIERS.index(tier)
    problems = [f"{t} asked {asked[t]}/{rounds}" for t in TIERS[:at + 1] if asked[t] != rounds]
    if cancelled < rounds:
        problems.append(f"{tier} cancelled {cancelled}/{rounds}")
    problems += [f"{t} asked {asked[t]} after the client left" for t in TIERS[at + 1:]
                 if asked[t]]
    problems += [f"{t} still has {n} in flight" for t, n in in_flight.items() if n]
    return problems


def attack_cascade_disconnects(url: str, route: Route, rounds: int = 3,
                               wait_s: float = 10.0) -> list[Verdict]:
    """Clients of CASCADE_MODEL that go away while their request is on its middle or its expert
    tier, streamed or not: that tier's request must be cancelled, no later tier asked, and the
    route must serve a probe by the expert afterwards. `wait_s` bounds the wait for a request to
    reach its tier (past the tiers before it: in stream `buffer` mode, their streams whole) and,
    streamed to the expert, for its first bytes."""
    host, port = _host_port(url)
    out: list[Verdict] = []
    for tier, stream in CASCADE_DISCONNECTS:
        route.reset()
        route.mode(tier, "slow_stream" if stream else "slow", delay_ms=300 if stream else 4000)
        slow = functools.partial(route.stats, tier)
        cancel_times: list[float] = []
        reached = saw_chunk = 0
        body = json.dumps(chat_body(stream=stream, model=CASCADE_MODEL)).encode()
        # FAKE_MODEL's probes only: the route's FAKEs then see the attacker's requests alone.
        with Prober(url, interval=0.2) as prober:
            for _ in range(rounds):
                before = slow()["cancelled"]
                with socket.create_connection((host, port), timeout=wait_s) as s:
                    s.sendall(request_bytes(body, headers={"connection": "keep-alive"}))
                    if _wait_for(_above(slow, "in_flight", 0), wait_s) is not None:
                        reached += 1
                    if stream and tier == "expert":
                        # The expert's stream goes through: leave once it has begun.
                        with contextlib.suppress(OSError):
                            data = s.recv(65536)
                            saw_chunk += int(b"data: " in data or b"200 OK" in data)
                    t0 = time.monotonic()
                took = _wait_for(_above(slow, "cancelled", before), 5.0)
                if took is not None:
                    cancel_times.append(time.monotonic() - t0)
            _wait_for(lambda: not any(route.stat("in_flight").values()), 10.0)
            time.sleep(SETTLE_S)
        asked, in_flight = route.asked(), route.stat("in_flight")
        cancelled = int(slow()["cancelled"])
        route.mode(tier, "ok")
        problems = route_disconnect_problems(tier, rounds, asked, cancelled, in_flight)
        how = "streamed" if stream else "non-stream"
        v = Verdict(f"{CASCADE_MODEL}: disconnect while on the {tier} ({how})",
                    f"{tier} cancelled {cancelled}/{rounds}; asked " +
                    ", ".join(f"{t} {asked[t]}" for t in TIERS), not problems,
                    model=CASCADE_MODEL)
        v.extra.update({"tiers_asked": asked, "reached_tier": reached})
        if problems:
            v.extra["problems"] = problems
        if cancel_times:
            v.extra["cancel_after_ms_max"] = round(max(cancel_times) * 1000, 1)
        if stream and tier == "expert":
            v.extra["saw_first_chunk"] = saw_chunk
        # The route still serves once the attacker has gone (its breakers untouched by clients
        # that left): a probe walks it to the expert.
        prober.probe_once(CASCADE_MODEL)
        out.append(prober.fill(v))
    return out


def attack_idle(url: str, count: int, give_up_s: float, partial: bytes, name: str,
                rss: Callable[[], int] | None, deadline_s: float | None = None,
                probe: Sequence[str] = ONE_TIER) -> Verdict:
    """`count` connections that send nothing (or half a request) and wait for the server to close
    them (at most `give_up_s`): the report says what each got, and how long it was held. With
    `deadline_s` (the server's header deadline), clean means every one closed within it + 5 s."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = max(1, min(count, soft - 256))  # our own fds: leave room for everything else
    host, port = _host_port(url)
    rss_before = rss() if rss else 0
    peak: list[int] = []

    async def run() -> list[Any]:
        async def sample() -> None:
            await asyncio.sleep(min(give_up_s, deadline_s or give_up_s) * 0.8)
            if rss:
                peak.append(rss())

        sampler = asyncio.ensure_future(sample())
        held = await paced(count, 0, lambda: hold_connection(host, port, partial, give_up_s))
        sampler.cancel()
        return held

    t0 = time.monotonic()
    with Prober(url, interval=0.1, models=probe) as prober:
        held = asyncio.run(run())
    phase = Phase.of(name, deadline_s or give_up_s, held, time.monotonic() - t0)
    opened = sum(1 for h in held if h.answer != "refused")
    closed = sum(1 for h in held if h.ended is not None and h.answer != "refused")
    clean = (phase.all_closed_in_bound if deadline_s is not None
             else opened >= min(count, 100))
    outcome = phase.line() if closed else f"{opened} opened, none closed by the server " \
        f"within {give_up_s:g} s"
    v = Verdict(name, outcome, clean)
    v.extra.update({"opened": opened, "closed_by_server": closed, "answers": phase.answers,
                    "held_median_s": phase.held_p50_s, "held_p99_s": phase.held_p99_s,
                    "held_max_s": phase.held_max_s, "deadline_s": deadline_s,
                    "bound_s": None if deadline_s is None else deadline_s + SLACK_S,
                    "gave_up_after_s": give_up_s})
    if rss and peak:
        v.extra["rss_growth_mib"] = round((peak[0] - rss_before) / 2**20, 1)
    return prober.fill(v)


def attack_slow_senders(url: str, count: int, seconds: float,
                        deadline_s: float | None = None,
                        probe: Sequence[str] = ONE_TIER) -> Verdict:
    """Slowloris: `count` clients trickle a request, one header line every second, for at most
    `seconds`; what each got and when (a header deadline closes them whatever they trickle)."""
    host, port = _host_port(url)

    async def one(i: int) -> tuple[str, float]:
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            return "refused", 0.0
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            deadline = time.monotonic() + seconds
            k = 0
            while time.monotonic() < deadline:
                writer.write(f"x-slow-{k}: {'a' * 10}\r\n".encode())
                await writer.drain()
                k += 1
                try:
                    data = await asyncio.wait_for(reader.read(1024), 1.0)
                except TimeoutError:
                    continue
                answer = (data[9:12].decode() if data.startswith(b"HTTP/1.") else
                          "answered" if data else "closed by server")
                return answer, time.monotonic() - t0
            return "still open", time.monotonic() - t0
        except OSError:
            return "closed by server", time.monotonic() - t0
        finally:
            writer.close()

    async def run() -> list[tuple[str, float]]:
        return await asyncio.gather(*(one(i) for i in range(count)))

    with Prober(url, interval=0.1, models=probe) as prober:
        results = asyncio.run(run())
    summary: dict[str, int] = {}
    for answer, _ in results:
        summary[answer] = summary.get(answer, 0) + 1
    held = sorted(t for answer, t in results if answer != "still open")
    within = (sum(1 for t in held if t <= deadline_s + 5.0) if deadline_s is not None
              else len(held))
    v = Verdict(f"slow senders ({count} x up to {seconds:.0f} s, a header line a second)",
                f"{json.dumps(summary)}; held {held[len(held) // 2]:.1f} s median, "
                f"{held[-1]:.1f} s max" if held else json.dumps(summary),
                deadline_s is None or within == count)
    v.extra.update({"results": summary, "held_max_s": round(held[-1], 2) if held else None,
                    "deadline_s": deadline_s})
    return prober.fill(v)


@dataclass
class Target:
    """calibserve under attack: FAKE_MODEL over `fake`, CASCADE_MODEL over `route`."""

    url: str
    fake: FakeUpstream
    route: Route
    rss: Callable[[], int] | None
    max_n: int


@contextlib.contextmanager
def target(in_process: bool = False) -> Iterator[Target]:
    """calibserve (a subprocess, or in this process) serving FAKE_MODEL and CASCADE_MODEL, each
    over FAKE upstreams of their own (a `--config` file: the command line serves one model)."""
    with FakeUpstream() as fake, route_over_fakes() as route:
        models = [{"name": FAKE_MODEL, "upstreams": [fake.url], "upstream_model": FAKE_MODEL},
                  route.model()]
        if in_process:
            settings = fake_settings(fake.url, models=models)
            with InProcessServer(settings) as srv:
                yield Target(srv.url, fake, route, None, settings.max_n)
            return
        with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
            config = Path(tmp) / "calibserve.yaml"
            config.write_text(json.dumps({"models": models}))
            with CalibserveProcess(["--config", str(config), "--log-level", "warning"]) as proc:
                yield Target(proc.url, fake, route, proc.rss, 16)


Step = tuple[str, Callable[[], list[Verdict]]]


def plan(url: str, fake: FakeUpstream, rss: Callable[[], int] | None, max_n: int,
         idle: int, slow: int, slow_s: float, hold_s: float,
         route: Route | None = None) -> list[Step]:
    """The attacks `run_all` runs, in order. With `route` (CASCADE_MODEL's FAKEs), the prober asks
    both models throughout, and the bodies, huge asks and disconnects are run again against
    CASCADE_MODEL."""
    limit = 4 * 1024 * 1024
    header = deadlines({"header_timeout": None})["header_timeout"]
    give_up = header + hold_s
    probe = ONE_TIER if route is None else BOTH
    steps: list[Step] = [
        ("bodies", lambda: attack_bodies(url, fake, limit, probe=probe)),
        ("huge asks", lambda: attack_huge_asks(url, max_n, probe=probe)),
        ("model paths", lambda: attack_model_paths(url, probe=probe)),
        ("disconnects", lambda: attack_disconnects(url, fake, probe=probe)),
    ]
    if route is not None:
        steps += [
            (f"{CASCADE_MODEL} bodies",
             lambda: attack_bodies(url, fake, limit, route=route, probe=probe)),
            (f"{CASCADE_MODEL} huge asks",
             lambda: attack_huge_asks(url, max_n, route=route, probe=probe)),
            (f"{CASCADE_MODEL} disconnects", lambda: attack_cascade_disconnects(url, route)),
        ]
    steps += [
        ("idle", lambda: [attack_idle(url, idle, give_up, b"", f"{idle} idle connections", rss,
                                      header, probe=probe),
                          attack_idle(url, min(idle, 500), give_up,
                                      b"POST /v1/chat/completions HTTP/1.1\r\n",
                                      f"{min(idle, 500)} half-sent requests", rss, header,
                                      probe=probe)]),
        ("slow senders", lambda: [attack_slow_senders(url, slow, max(slow_s, header + 5),
                                                      header, probe=probe)]),
    ]
    return steps


def run_all(url: str, fake: FakeUpstream, rss: Callable[[], int] | None, max_n: int,
            idle: int, slow: int, slow_s: float, hold_s: float,
            progress: Callable[[str], None] | None = None,
            route: Route | None = None) -> list[Verdict]:
    """Every attack in turn (`plan`). `hold_s` is how long idle and half-sent connections wait
    for the server past its header deadline before the attacker gives up (and reports them
    held)."""
    out: list[Verdict] = []
    for name, step in plan(url, fake, rss, max_n, idle, slow, slow_s, hold_s, route):
        if progress:
            progress(name)
        out.extend(step())
    return out


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--slow", type=int, default=100)
    parser.add_argument("--slow-seconds", type=float, default=20)
    parser.add_argument("--hold", type=float, default=8,
                        help="seconds idle connections wait past the header deadline")
    parser.add_argument("--quick", action="store_true", help="500 idle, 30 slow for 6 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.idle, args.slow, args.slow_seconds, args.hold = 500, 30, 6, 6
    console = Console(width=160)
    with target() as t, console.status("hostile clients") as status:
        verdicts = run_all(t.url, t.fake, t.rss, t.max_n, args.idle, args.slow,
                           args.slow_seconds, args.hold, route=t.route,
                           progress=lambda s: status.update(f"hostile clients: {s}"))
    table = Table(title=f"hostile clients (calibserve subprocess over FAKE upstreams: "
                        f"{FAKE_MODEL}, one tier; {CASCADE_MODEL}, three)")
    for col in ("attack", "attacker saw (and what was held, how long)", "clean",
                "probes ok/failed", "probe p99 ms", "extra"):
        table.add_column(col)
    for v in verdicts:
        table.add_row(v.attack, v.outcome, "yes" if v.clean else "NO",
                      f"{v.probes_ok}/{v.probes_failed}", f"{v.probe_p99_ms:.1f}",
                      json.dumps(v.extra)[:80])
    console.print(table)
    write_result("hostile", {"verdicts": [asdict(v) | {"ok": v.ok} for v in verdicts]})
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())

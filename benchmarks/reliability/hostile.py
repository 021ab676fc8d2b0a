"""Hostile clients: oversized and invalid bodies, slow senders, disconnects, idle hordes, huge asks,
hostile model-list paths.

Each attack runs against calibserve (a subprocess, over the recording FAKE upstream) while a
prober sends ordinary chat requests; the verdict for each attack is:

- the attacker got a clean answer (an OpenAI-shaped 4xx) or a clean close, never a 5xx the
  server caused and never a hang past a bounded wait;
- the server kept serving others (every probe during the attack succeeded; latency reported);
- for client disconnects: the upstream saw the request cancelled (the fake counts connections
  closed under an unfinished answer);
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
import json
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from benchmarks.reliability.harness import (
    FAKE_MODEL,
    FakeUpstream,
    Percentiles,
    calibserve_over_fake,
    chat_body,
    error_shape_ok,
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

    @property
    def ok(self) -> bool:
        return self.clean and self.probes_failed == 0


class Prober:
    """Sends ordinary chat requests in a thread while an attack runs."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        self.url = url
        self.interval = interval
        self.ok: list[float] = []
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = client.post("/v1/chat/completions", json=chat_body())
                    if r.status_code == 200 and "confidence" in r.json()["choices"][0]:
                        self.ok.append(time.perf_counter() - t0)
                    else:
                        self.failed.append(f"status {r.status_code}")
                except httpx.HTTPError as exc:
                    self.failed.append(repr(exc)[:120])
                self._stop.wait(self.interval)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def fill(self, v: Verdict) -> Verdict:
        v.probes_ok, v.probes_failed = len(self.ok), len(self.failed)
        v.probe_p99_ms = Percentiles.of(self.ok).p99_ms
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
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value.strip())
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


# --- attacks ------------------------------------------------------------------------------------

def attack_bodies(url: str, fake: FakeUpstream, limit: int) -> list[Verdict]:
    """Oversized, invalid UTF-8, deep nesting, wrong content type, garbage request lines."""
    big = json.dumps({**chat_body(), "messages": [{"role": "user",
                                                   "content": "x" * (limit + 10)}]}).encode()
    deep = b'{"model": "fake-model", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    cases: list[tuple[str, bytes, tuple[int, ...]]] = [
        ("over the limit (content-length)", request_bytes(big), (413,)),
        ("over the limit (chunked, no length)", request_bytes(big, chunked=True), (413,)),
        ("lying content-length (says 100, sends more)",
         request_bytes(big, headers={"content-length": "100"}), (400,)),
        ("content-length huge, body small",
         request_bytes(b"{}", headers={"content-length": str(10**12)}), (413,)),
        ("invalid UTF-8 in a string",
         request_bytes(b'{"model": "fake-model", "messages": [{"role": "user", '
                       b'"content": "\xff\xfe\xc3\x28"}]}'), (400,)),
        ("invalid UTF-8 in model name",
         request_bytes(b'{"model": "\xc0\xaf", "messages": [{"role": "user", '
                       b'"content": "hi"}]}'), (400,)),
        # json.loads detects UTF-16/32 by itself: accepting it is lenient, not wrong.
        ("UTF-16 body", request_bytes(json.dumps(chat_body()).encode("utf-16")), (200, 400)),
        ("lone surrogate escape",
         request_bytes(b'{"model": "fake-model", "messages": [{"role": "user", '
                       b'"content": "\\ud800"}]}'), (200, 400)),
        ("deeply nested JSON (50k levels)", request_bytes(deep), (400,)),
        ("empty body", request_bytes(b""), (400,)),
        ("text/plain body", request_bytes(json.dumps(chat_body()).encode(),
                                          headers={"content-type": "text/plain"}), (200, 400, 415)),
        ("JSON null", request_bytes(b"null"), (400,)),
        ("NaN temperature", request_bytes(b'{"model": "fake-model", "messages": [{"role": '
                                          b'"user", "content": "hi"}], "temperature": NaN}'),
         (400,)),
        ("NaN in a pass-through field",
         request_bytes(b'{"model": "fake-model", "messages": [{"role": "user", '
                       b'"content": "hi"}], "top_k": NaN}'), (400,)),
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64,
         (400,)),
        ("header with invalid UTF-8",
         request_bytes(json.dumps(chat_body()).encode(), headers={"x-evil": "EVIL"})
         .replace(b"EVIL", b"\xff\xfe"), (200, 400)),
    ]
    out: list[Verdict] = []
    for name, data, allowed in cases:
        before = fake.stats()["largest_body"]
        with Prober(url) as prober:
            status, buf = raw_exchange(url, data, timeout=20)
        clean, outcome = _clean(status, buf, allowed, protocol=name.startswith("garbage"))
        v = prober.fill(Verdict(name, outcome, clean))
        if "limit" in name:
            # An oversized body must never reach the upstream.
            v.extra["largest_body_upstream"] = fake.stats()["largest_body"]
            v.clean = v.clean and fake.stats()["largest_body"] <= max(before, limit)
        out.append(v)
    return out


def attack_huge_asks(url: str, max_n: int) -> list[Verdict]:
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
            path = ("/v1/completions" if "prompt" in body else "/v1/responses" if "input" in body
                    else "/v1/chat/completions")
            with Prober(url) as prober:
                t0 = time.perf_counter()
                r = client.post(path, json=body)
                took = time.perf_counter() - t0
            shaped = r.status_code < 400 or error_shape_ok(r)
            v = prober.fill(Verdict(name, f"{r.status_code} in {took * 1000:.0f} ms",
                                    r.status_code in allowed and shaped))
            out.append(v)
    return out


def attack_model_paths(url: str) -> list[Verdict]:
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
            with Prober(url) as prober:
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


def attack_disconnects(url: str, fake: FakeUpstream, rounds: int = 5) -> list[Verdict]:
    """Clients that go away mid-stream or mid-wait: the upstream request must be cancelled."""
    out: list[Verdict] = []
    for stream in (True, False):
        fake.reset()
        fake.mode("slow_stream" if stream else "slow", delay_ms=300 if stream else 4000)
        cancel_times: list[float] = []
        saw_chunk = 0
        with Prober(url, interval=0.2) as prober:
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
                took = _wait_for(lambda b=before: fake.stats()["cancelled"] > b, 5.0)
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


def attack_idle(url: str, count: int, give_up_s: float, partial: bytes, name: str,
                rss: Callable[[], int] | None, deadline_s: float | None = None) -> Verdict:
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
    with Prober(url, interval=0.1) as prober:
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
                        deadline_s: float | None = None) -> Verdict:
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

    with Prober(url, interval=0.1) as prober:
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


@contextlib.contextmanager
def target(in_process: bool = False) -> Iterator[tuple[str, FakeUpstream, Callable[[], int] | None,
                                                       int]]:
    with calibserve_over_fake(in_process=in_process) as (srv, fake):
        rss = srv.rss if hasattr(srv, "rss") else None
        yield srv.url, fake, rss, 16


def run_all(url: str, fake: FakeUpstream, rss: Callable[[], int] | None, max_n: int,
            idle: int, slow: int, slow_s: float, hold_s: float,
            progress: Callable[[str], None] | None = None) -> list[Verdict]:
    """Every attack in turn. `hold_s` is how long idle and half-sent connections wait for the
    server past its header deadline before the attacker gives up (and reports them held)."""
    limit = 4 * 1024 * 1024
    header = deadlines({"header_timeout": None})["header_timeout"]
    give_up = header + hold_s
    out: list[Verdict] = []
    steps: list[tuple[str, Callable[[], list[Verdict]]]] = [
        ("bodies", lambda: attack_bodies(url, fake, limit)),
        ("huge asks", lambda: attack_huge_asks(url, max_n)),
        ("model paths", lambda: attack_model_paths(url)),
        ("disconnects", lambda: attack_disconnects(url, fake)),
        ("idle", lambda: [attack_idle(url, idle, give_up, b"", f"{idle} idle connections", rss,
                                      header),
                          attack_idle(url, min(idle, 500), give_up,
                                      b"POST /v1/chat/completions HTTP/1.1\r\n",
                                      f"{min(idle, 500)} half-sent requests", rss, header)]),
        ("slow senders", lambda: [attack_slow_senders(url, slow, max(slow_s, header + 5),
                                                      header)]),
    ]
    for name, step in steps:
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
    with target() as (url, fake, rss, max_n), console.status("hostile clients") as status:
        verdicts = run_all(url, fake, rss, max_n, args.idle, args.slow, args.slow_seconds,
                           args.hold, progress=lambda s: status.update(f"hostile clients: {s}"))
    table = Table(title="hostile clients (calibserve subprocess over the FAKE upstream)")
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

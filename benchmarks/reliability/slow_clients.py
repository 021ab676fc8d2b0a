"""Slow clients against calibserve with its engine behind it: half-sent headers, bodies that stop,
readers that never read, connections that send nothing.

`calibserve serve` runs as a child with a managed REAL vLLM engine (the demo `aligned` model, as
faults.py's engine kill); `--fake` puts the recording FAKE upstream behind it instead (canned
answers, no model: a quick run, and the CI subset in tests/reliability/). While a prober in a
process of its own sends ordinary chat requests (a short reply, one keep-alive connection, every
50 ms), the attacks run one after the other:

1. `half-sent`: N connections (paced, `--rate` a second) each send a request line and one header,
   then nothing (slowloris);
2. `stalled-body`: headers announcing a 4 KiB body, 100 bytes of it, then nothing;
3. `never-reads`: a streamed chat request with a long answer (16 choices, 20 alternatives a token;
   the FAKE: 40,000 tokens), from a socket with a 4 KiB receive buffer that is never read;
4. `idle`: connections that send nothing at all.

For every attacking connection: what it got (408, 503, a close, a reset) and how long the server
held it (connect to the server's close, seen from the client; a reader that never reads is
watched through TCP_INFO, so it need not read to see the close). For the server process: its
descriptors (all, and the sockets of client connections) before, at the peak and after, its
resident memory, and its open-connections gauge; the prober's latency in each phase.

Floors (issue 32): every half-sent request closed within the header deadline + 5 s; the probes'
p99 under 50 ms throughout; descriptors back to the baseline after. This process needs a
descriptor per attacking connection: it raises its soft open-file limit (RLIMIT_NOFILE) to what
the attack needs, up to the hard limit, and says so in the report.

    python -m benchmarks.reliability.slow_clients [--fake] [--half-sent 5000] [--rate 500]
        [--bodies 200] [--readers 4] [--idle 500] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.reliability.harness import (
    FAKE_MODEL,
    CalibserveProcess,
    FakeUpstream,
    Percentiles,
    metric_sum,
    scrape,
    write_result,
)
from calibserve.testing.checks import tcp_state

HALF_SENT = b"POST /v1/chat/completions HTTP/1.1\r\nhost: calibserve\r\n"
SLACK_S = 5.0  # the floor: each connection closed within its deadline plus this
PROBE_P99_MS = 50.0
LONG_MODEL = "fake-long"  # --fake: a second FAKE whose answers are megabytes long
_TCP_ESTABLISHED = 1
_TCP_STATES = {7: "reset", 8: "closed", 11: "closed"}  # CLOSE (after an RST), CLOSE_WAIT, CLOSING


# -- one attacking connection -----------------------------------------------------------------

@dataclass
class Held:
    """One attacking connection: when it was opened, when the server closed it, what it got."""

    opened: float  # monotonic
    ended: float | None = None  # None: still open when the attacker gave up
    answer: str = "open"  # "408", "503", ... (a status), "closed", "reset", "open", "refused"

    @property
    def held_s(self) -> float | None:
        return None if self.ended is None else self.ended - self.opened


@dataclass
class Phase:
    """One attack's figures."""

    attack: str
    count: int
    deadline_s: float  # what should close these (the server's deadline for them)
    answers: dict[str, int] = field(default_factory=dict)
    held_p50_s: float = float("nan")
    held_p99_s: float = float("nan")
    held_max_s: float = float("nan")
    within_bound: int = 0  # closed within deadline + SLACK_S
    seconds: float = 0.0
    probes: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, attack: str, deadline_s: float, held: list[Held], seconds: float) -> Phase:
        answers: dict[str, int] = {}
        for h in held:
            answers[h.answer] = answers.get(h.answer, 0) + 1
        times = sorted(h.held_s for h in held if h.held_s is not None)
        bound = deadline_s + SLACK_S
        p = cls(attack, len(held), deadline_s, answers, seconds=round(seconds, 1),
                within_bound=sum(1 for t in times if t <= bound))
        if times:
            p.held_p50_s = round(statistics.median(times), 2)
            p.held_p99_s = round(times[min(len(times) - 1, int(0.99 * len(times)))], 2)
            p.held_max_s = round(times[-1], 2)
        return p

    @property
    def all_closed_in_bound(self) -> bool:
        return self.within_bound == self.count

    def line(self) -> str:
        """What was held and for how long, in one line (the run report's)."""
        return (f"{self.count} held {self.held_p50_s:g} s median, {self.held_p99_s:g} s p99, "
                f"{self.held_max_s:g} s max (deadline {self.deadline_s:g} s); "
                f"{self.within_bound}/{self.count} closed within {self.deadline_s + SLACK_S:g} s; "
                f"answers {self.answers}")


def _answer_of(data: bytes) -> str:
    if data.startswith(b"HTTP/1."):
        return data[9:12].decode("ascii", "replace")
    return "closed" if not data else "other"


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        return await asyncio.open_connection(host, port)
    except OSError:
        return None


async def hold_connection(host: str, port: int, send: bytes, give_up_s: float) -> Held:
    """Open a connection, send `send` (maybe nothing), then wait for the server to close it."""
    conn = await _open(host, port)
    held = Held(time.monotonic())
    if conn is None:
        held.answer, held.ended = "refused", held.opened
        return held
    reader, writer = conn
    data = b""
    try:
        if send:
            writer.write(send)
        deadline = held.opened + give_up_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            part = await asyncio.wait_for(reader.read(65536), remaining)
            if not part:
                held.ended = time.monotonic()
                held.answer = _answer_of(data)
                break
            data += part
    except TimeoutError:
        pass
    except OSError:
        held.ended, held.answer = time.monotonic(), _answer_of(data) if data else "reset"
    finally:
        writer.close()
    return held


async def paced(count: int, rate: float, one: Callable[[], Any]) -> list[Held]:
    """`count` attackers started `rate` a second (all at once when rate is 0)."""
    t0 = time.monotonic()

    async def start(i: int) -> Held:
        if rate > 0:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        result: Held = await one()
        return result

    return list(await asyncio.gather(*(start(i) for i in range(count))))


def half_sent(host: str, port: int, count: int, rate: float, give_up_s: float) -> list[Held]:
    return asyncio.run(paced(count, rate,
                             lambda: hold_connection(host, port, HALF_SENT, give_up_s)))


def stalled_bodies(host: str, port: int, count: int, rate: float,
                   give_up_s: float) -> list[Held]:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: calibserve\r\n"
            b"content-type: application/json\r\ncontent-length: 4096\r\n\r\n")
    start = head + b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 44
    return asyncio.run(paced(count, rate, lambda: hold_connection(host, port, start, give_up_s)))


def idle(host: str, port: int, count: int, rate: float, give_up_s: float) -> list[Held]:
    return asyncio.run(paced(count, rate, lambda: hold_connection(host, port, b"", give_up_s)))


async def _never_read(host: str, port: int, request: bytes, give_up_s: float) -> Held:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    held = Held(time.monotonic())
    try:
        await loop.sock_connect(sock, (host, port))
        held.opened = time.monotonic()
        await loop.sock_sendall(sock, request)
        while time.monotonic() - held.opened < give_up_s:
            state = tcp_state(sock)
            if state != _TCP_ESTABLISHED:
                held.ended = time.monotonic()
                held.answer = _TCP_STATES.get(state, f"tcp state {state}")
                break
            await asyncio.sleep(0.05)
    except OSError:
        held.ended, held.answer = time.monotonic(), "refused"
    finally:
        sock.close()
    return held


def never_readers(host: str, port: int, count: int, request: bytes,
                  give_up_s: float) -> list[Held]:
    return asyncio.run(paced(count, 0, lambda: _never_read(host, port, request, give_up_s)))


# -- the server process, seen from outside ----------------------------------------------------

def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def client_sockets(pid: int, port: int) -> int:
    """Descriptors of `pid` that are client connections to its `port` (not the listener, not its
    upstream connections): its socket inodes that /proc/net/tcp lists with that local port."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    found = set()  # by inode: a table read while connections come and go can repeat a row
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if (int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] != "0A"
                        and cols[9] in inodes):
                    found.add(cols[9])
    return len(found)


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Watch:
    """Samples the server's descriptors, client sockets and memory every `every` s."""

    def __init__(self, pid: int, port: int, every: float = 0.5) -> None:
        self.pid, self.port, self.every = pid, port, every
        self.samples: list[tuple[float, int, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> tuple[float, int, int, float]:
        return (time.monotonic(), fd_count(self.pid), client_sockets(self.pid, self.port),
                rss_mib(self.pid))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.now())
            self._stop.wait(self.every)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def peak(self, since: float, until: float) -> dict[str, Any]:
        window = [s for s in self.samples if since <= s[0] <= until] or [self.now()]
        return {"fds_peak": max(s[1] for s in window),
                "client_sockets_peak": max(s[2] for s in window),
                "rss_mib_peak": round(max(s[3] for s in window), 1)}


# -- the prober: ordinary requests, in a process of its own -----------------------------------

def probe_loop(host: str, port: int, request: bytes, interval: float, stop: Any,
               out: str) -> None:
    """Send `request` every `interval` s on one keep-alive connection (a new one when the server
    closes it) until `stop` is set; write [(sent monotonic, seconds, status or error)] to `out`."""
    from benchmarks.rawhttp import Conn

    async def run() -> list[tuple[float, float, Any]]:
        results: list[tuple[float, float, Any]] = []
        conn: Conn | None = None
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = await Conn.open(host, port)
                status, _ = await asyncio.wait_for(conn.request(request), 30)
                results.append((t0, time.monotonic() - t0, status))
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                results.append((t0, time.monotonic() - t0, type(exc).__name__))
                if conn is not None:
                    conn.close()
                conn = None
            await asyncio.sleep(max(0.0, t0 + interval - time.monotonic()))
        if conn is not None:
            conn.close()
        return results

    Path(out).write_text(json.dumps(asyncio.run(run())))


@contextlib.contextmanager
def prober(host: str, port: int, request: bytes, interval: float = 0.05
           ) -> Iterator[Callable[[], list[tuple[float, float, Any]]]]:
    """Run the prober for the block; yields a function that returns its results (after)."""
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    out = Path(f"/tmp/slow-clients-probe-{os.getpid()}.json")
    proc = ctx.Process(target=probe_loop, args=(host, port, request, interval, stop, str(out)),
                       daemon=True)
    proc.start()
    results: list[tuple[float, float, Any]] = []
    try:
        yield lambda: results
    finally:
        stop.set()
        proc.join(timeout=60)
        if out.exists():
            results.extend(tuple(r) for r in json.loads(out.read_text()))
            out.unlink()


def probe_stats(results: list[tuple[float, float, Any]], since: float, until: float
                ) -> dict[str, Any]:
    window = [r for r in results if since <= r[0] <= until]
    ok = [r[1] for r in window if r[2] == 200]
    p = Percentiles.of(ok)
    return {"n": len(window), "ok": len(ok), "failed": len(window) - len(ok),
            "p50_ms": round(p.p50_ms, 1), "p99_ms": round(p.p99_ms, 1),
            "max_ms": round(p.max_ms, 1),
            "failures": sorted({str(r[2]) for r in window if r[2] != 200})[:5]}


# -- the run ----------------------------------------------------------------------------------

def raise_fd_limit(needed: int) -> dict[str, int]:
    """Raise this process's soft RLIMIT_NOFILE to `needed` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = soft
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return {"soft_before": soft, "soft_now": target,
            "hard": -1 if hard == resource.RLIM_INFINITY else hard}


def chat_request(model: str, port: int, stream: bool = False, **extra: Any) -> bytes:
    from benchmarks.rawhttp import build_request

    body: dict[str, Any] = {
        "model": model, "max_tokens": 4,
        "messages": [{"role": "user", "content":
                      "question : what is the color of ent1 ? A red B blue C green D gold"}]}
    if stream:
        body["stream"] = True
    body.update(extra)
    return build_request("127.0.0.1", port, "/v1/chat/completions", body)


def long_stream_request(model: str, port: int, fake: bool) -> bytes:
    """A streamed answer of megabytes: more than the kernel's socket buffers hold."""
    if fake:
        return chat_request(model, port, stream=True)
    return chat_request(model, port, stream=True, max_tokens=200, n=16, logprobs=True,
                        top_logprobs=20, ignore_eos=True)


def stream_size(host: str, port: int, request: bytes) -> tuple[int, float]:
    """Bytes of one long answer and the seconds it took, read by an ordinary reader (so the
    report can say whether it outgrew the socket buffers, and how long it is in the making)."""
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=120) as sock:
        sock.sendall(request.replace(b"content-type:", b"connection: close\r\ncontent-type:", 1))
        total = 0
        while part := sock.recv(1 << 20):
            total += len(part)
    return total, time.monotonic() - t0


@contextlib.contextmanager
def target(fake: bool, model_dir: Path, flags: list[str]
           ) -> Iterator[tuple[CalibserveProcess, str, str]]:
    """calibserve as a child; yields (process, model for probes, model for long streams)."""
    with contextlib.ExitStack() as stack:
        if fake:
            short = stack.enter_context(FakeUpstream())
            long = stack.enter_context(FakeUpstream(tokens=40_000))
            config = Path(f"/tmp/slow-clients-{os.getpid()}.yaml")
            config.write_text(json.dumps({"models": [
                {"name": FAKE_MODEL, "upstreams": [short.url], "upstream_model": FAKE_MODEL},
                {"name": LONG_MODEL, "upstreams": [long.url], "upstream_model": FAKE_MODEL}]}))
            stack.callback(config.unlink)
            args = ["--config", str(config), "--log-level", "warning", *flags]
            proc = stack.enter_context(CalibserveProcess(args, start_timeout=60))
            yield proc, FAKE_MODEL, LONG_MODEL
        else:
            log = Path(f"/tmp/slow-clients-{os.getpid()}.log")
            args = ["--model", str(model_dir), "--served-model-name", "aligned",
                    "--max-model-len", "256", "--log-level", "warning", *flags]
            proc = stack.enter_context(CalibserveProcess(args, log_path=log, start_timeout=900))
            yield proc, "aligned", "aligned"


def deadlines(flags: dict[str, float | None]) -> dict[str, float]:
    from calibserve.server.config import ServerSettings

    defaults = ServerSettings()
    return {name: value if value is not None else float(getattr(defaults, f"{name}_s"))
            for name, value in flags.items()}


def run(fake: bool, model_dir: Path, half: int, rate: float, bodies: int, readers: int,
        idles: int, limits: dict[str, float | None], max_connections: int | None,
        progress: Callable[[str], None] = print) -> dict[str, Any]:
    times = deadlines(limits)
    flags = [f"--{name.replace('_', '-')}={value:g}" for name, value in limits.items()
             if value is not None]
    if max_connections is not None:
        flags.append(f"--max-connections={max_connections}")
    fd_limit = raise_fd_limit(max(half, idles, bodies) + 512)
    out: dict[str, Any] = {"upstream": "FAKE (canned answers)" if fake else
                           f"REAL vLLM CPU engine, managed ({model_dir})",
                           "deadlines_s": times, "max_connections": max_connections,
                           "attacker_fd_limit": fd_limit, "load_average_start": os.getloadavg()}
    progress("starting calibserve" + ("" if fake else " and its engine (minutes on a CPU)"))
    with target(fake, model_dir, flags) as (proc, model, long_model):
        host, port = "127.0.0.1", proc.port
        pid = proc.proc.pid
        probe = chat_request(model, port)
        for _ in range(20):  # warm-up (the engine's first requests are slow)
            httpx.post(f"{proc.url}/v1/chat/completions", content=probe.split(b"\r\n\r\n", 1)[1],
                       headers={"content-type": "application/json"}, timeout=120)
        long_req = long_stream_request(long_model, port, fake)
        size, making = stream_size(host, port, long_req)
        out["long_stream"] = {"bytes": size, "read_whole_s": round(making, 2)}
        phases: list[Phase] = []
        with Watch(pid, port) as watch, prober(host, port, probe) as probes:
            time.sleep(5.0)  # the baseline, probed
            t_base = time.monotonic()
            base = watch.now()
            out["baseline"] = {"fds": base[1], "client_sockets": base[2],
                               "rss_mib": round(base[3], 1)}
            plan: list[tuple[str, int, float, Callable[[], list[Held]]]] = [
                ("half-sent headers", half, times["header_timeout"],
                 lambda: half_sent(host, port, half, rate,
                                   times["header_timeout"] + SLACK_S + 30)),
                ("body that stops", bodies, times["body_timeout"],
                 lambda: stalled_bodies(host, port, bodies, rate,
                                        times["body_timeout"] + SLACK_S + 30)),
                # Its writes cannot block before the answer has filled the socket buffers:
                # the deadline counts from then, at most the whole answer's making later.
                ("reader that never reads", readers, times["write_timeout"] + making,
                 lambda: never_readers(host, port, readers, long_req,
                                       times["write_timeout"] + SLACK_S + 120)),
                ("nothing sent", idles, times["header_timeout"],
                 lambda: idle(host, port, idles, rate, times["header_timeout"] + SLACK_S + 30)),
            ]
            windows: list[tuple[Phase, float, float]] = []
            for name, count, deadline, attack in plan:
                if not count:
                    continue
                progress(f"{name}: {count}")
                before = scrape(proc.url)
                t0 = time.monotonic()
                held = attack()
                t1 = time.monotonic()
                phase = Phase.of(name, deadline, held, t1 - t0)
                after = scrape(proc.url)
                phase.server = {
                    **watch.peak(t0, t1),
                    "timeouts": {kind: metric_sum(after, "calibserve_connection_timeouts_total",
                                                  kind=kind)
                                 - metric_sum(before, "calibserve_connection_timeouts_total",
                                              kind=kind)
                                 for kind in ("header", "body", "keep_alive", "write")},
                    "refused": metric_sum(after, "calibserve_connections_refused_total")
                    - metric_sum(before, "calibserve_connections_refused_total"),
                }
                phases.append(phase)
                windows.append((phase, t0, t1))
                time.sleep(2.0)
            time.sleep(3.0)  # the last closes settle; still probed
            t_end = time.monotonic()
            end = watch.now()
        results = probes()
        gauge = metric_sum(scrape(proc.url), "calibserve_open_connections")
    for phase, t0, t1 in windows:
        phase.probes = probe_stats(results, t0, t1)
    out["phases"] = [asdict(p) | {"line": p.line()} for p in phases]
    out["probes_baseline"] = probe_stats(results, t_base - 5.0, t_base)
    out["probes_throughout"] = probe_stats(results, t_base, t_end)
    out["after"] = {"fds": end[1], "client_sockets": end[2], "rss_mib": round(end[3], 1),
                    "open_connections_gauge": gauge}
    out["load_average_end"] = os.getloadavg()
    half_phase = next((p for p in phases if p.attack == "half-sent headers"), None)
    out["floors"] = {
        "half_sent_closed_within_deadline_plus_5s": None if half_phase is None else
        f"{half_phase.within_bound}/{half_phase.count}",
        "probe_p99_ms_throughout": out["probes_throughout"]["p99_ms"],
        "probe_failures_throughout": out["probes_throughout"]["failed"],
        "client_sockets_back_to_baseline": end[2] <= base[2],
        "fds_after_minus_baseline": end[1] - base[1],
    }
    out["ok"] = bool(
        all(p.all_closed_in_bound for p in phases)
        and out["probes_throughout"]["failed"] == 0
        and out["probes_throughout"]["p99_ms"] < PROBE_P99_MS
        and end[2] <= base[2] and end[1] <= base[1])
    return out


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fake", action="store_true",
                        help="the FAKE upstream instead of the real engine")
    parser.add_argument("--model", type=Path, default=Path(
        os.environ.get("CALIBSERVE_DEMO_DIR", "/work/dev-demo")) / "aligned")
    parser.add_argument("--half-sent", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=500, help="connections opened a second")
    parser.add_argument("--bodies", type=int, default=200)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--header-timeout", type=float, default=None)
    parser.add_argument("--body-timeout", type=float, default=None)
    parser.add_argument("--keep-alive-timeout", type=float, default=None)
    parser.add_argument("--write-timeout", type=float, default=None)
    parser.add_argument("--max-connections", type=int, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="500 half-sent, 50 bodies, 2 readers, 100 idle")
    parser.add_argument("--name", default="slow_clients", help="results/NAME.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.half_sent, args.bodies, args.readers, args.idle = 500, 50, 2, 100
    console = Console(width=160)
    limits = {"header_timeout": args.header_timeout, "body_timeout": args.body_timeout,
              "keep_alive_timeout": args.keep_alive_timeout,
              "write_timeout": args.write_timeout}
    with console.status("slow clients") as status:
        result = run(args.fake, args.model, args.half_sent, args.rate, args.bodies,
                     args.readers, args.idle, limits, args.max_connections,
                     progress=lambda s: status.update(f"slow clients: {s}"))
    table = Table(title=f"slow clients against calibserve ({result['upstream']})")
    for col in ("attack", "n", "answers", "held median / p99 / max s", "closed in bound",
                "probe p99 ms", "server peak fds / client sockets / RSS MiB"):
        table.add_column(col)
    for p in result["phases"]:
        table.add_row(p["attack"], str(p["count"]), json.dumps(p["answers"]),
                      f"{p['held_p50_s']} / {p['held_p99_s']} / {p['held_max_s']}",
                      f"{p['within_bound']}/{p['count']} (<= {p['deadline_s'] + SLACK_S:g} s)",
                      f"{p['probes']['p99_ms']}",
                      f"{p['server']['fds_peak']} / {p['server']['client_sockets_peak']} / "
                      f"{p['server']['rss_mib_peak']}")
    console.print(table)
    console.print(f"baseline {result['baseline']}, after {result['after']}; probes throughout "
                  f"{result['probes_throughout']}; floors {result['floors']}")
    path = write_result(args.name, result)
    console.print(f"{'[green]ok[/]' if result['ok'] else '[red]FINDINGS[/]'}: {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Sustained load: N minutes at a fixed request rate through calibserve over the FAKE upstream.

Open-loop arrivals (a request starts every 1/rate seconds whether or not earlier ones are done,
so a slowing server shows up as latency rather than as a lower offered rate), a realistic mix
(chat 70%, chat streaming 15%, completions 10%, feedback for 5% of answers), and per window:
achieved rate, errors, p50/p99 latency (from each request's scheduled start), calibserve's resident
memory and the CPU share of calibserve, the load generator and the fake. Pass criteria: zero
errors, p99 stable (no window's p99 above 3x the median window's), RSS growth after warm-up
under 5%.

The load generator is benchmarks/rawhttp.py, not httpx: at 400 req/s an httpx client needed a
whole core by itself, fell behind, and its own queueing looked like a server stall.

    python -m benchmarks.reliability.soak                 # 10 minutes at 400 req/s
    python -m benchmarks.reliability.soak --quick          # 1 minute at 50 req/s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from benchmarks.rawhttp import ConnPool
from benchmarks.reliability.harness import (
    FAKE_MODEL,
    Percentiles,
    calibserve_over_fake,
    chat_body,
    write_result,
)

MAX_IN_FLIGHT = 512  # past this the client, not the server, is the bottleneck: count and skip


@dataclass
class Window:
    index: int
    started_s: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    rss_mib: float = 0.0
    load1: float = 0.0  # machine load at the window's end: other jobs share these 2 cores
    cpu_pct: dict[str, float] = field(default_factory=dict)  # per process, 100 = one core

    def summary(self, seconds: float) -> dict[str, Any]:
        p = Percentiles.of(self.latencies)
        return {"window": self.index, "from_s": round(self.started_s), "sent": self.sent,
                "ok": self.ok, "rate_per_s": round(self.ok / seconds, 1),
                "errors": self.errors, "p50_ms": round(p.p50_ms, 2), "p99_ms": round(p.p99_ms, 2),
                "max_ms": round(p.max_ms, 2), "rss_mib": round(self.rss_mib, 1),
                "load1": round(self.load1, 2), "cpu_pct": self.cpu_pct}


@dataclass
class Requests:
    """The mix's request bytes, built once (feedback bodies are built per answer)."""

    pool: ConnPool
    chat: bytes = b""
    stream: bytes = b""
    completion: bytes = b""

    def __post_init__(self) -> None:
        self.chat = self.pool.build("/v1/chat/completions", chat_body())
        self.stream = self.pool.build("/v1/chat/completions", chat_body(stream=True))
        self.completion = self.pool.build("/v1/completions", {"model": FAKE_MODEL,
                                                              "prompt": "hi", "max_tokens": 8})


async def _send(reqs: Requests, raw: bytes) -> tuple[int, bytes]:
    conn = await reqs.pool.get()
    try:
        status, body = await conn.request(raw)
    except BaseException:
        conn.close()
        raise
    reqs.pool.put(conn)
    return status, body


async def _one(reqs: Requests, rng: random.Random, window: Window, scheduled: float) -> None:
    """One request of the mix; latency counts from its scheduled start (open loop)."""
    roll = rng.random()
    try:
        if roll < 0.15:
            status, body = await _send(reqs, reqs.stream)
            good = status == 200 and body.rstrip().endswith(b"[DONE]") and b'"error"' not in body
        elif roll < 0.25:
            status, body = await _send(reqs, reqs.completion)
            good = status == 200
        else:
            status, body = await _send(reqs, reqs.chat)
            good = status == 200
            if good and roll > 0.95:
                answer_id = json.loads(body)["id"]
                fb = reqs.pool.build("/v1/feedback", {"id": answer_id,
                                                      "correct": rng.random() < 0.7})
                status, body = await _send(reqs, fb)
                good = status == 200
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        window.errors[type(exc).__name__] = window.errors.get(type(exc).__name__, 0) + 1
        return
    if good:
        window.ok += 1
        window.latencies.append(time.perf_counter() - scheduled)
    else:
        key = f"status {status}"
        window.errors[key] = window.errors.get(key, 0) + 1


CpuProbe = Callable[[], dict[str, float]]  # cumulative CPU seconds per process name


def _close_window(w: Window, rss: Callable[[], int] | None, cpu: CpuProbe | None,
                  last_cpu: dict[str, float], seconds: float) -> None:
    """Stamp a finished window with RSS, load and each process's CPU share over it."""
    if rss is not None:
        w.rss_mib = rss() / 2**20
    w.load1 = os.getloadavg()[0]
    if cpu is not None:
        now = cpu()
        w.cpu_pct = {k: round(100 * (v - last_cpu.get(k, 0.0)) / seconds, 1)
                     for k, v in now.items()}
        last_cpu.update(now)


async def _soak(url: str, seconds: float, rate: float, window_s: float,
                rss: Callable[[], int] | None, tick: Callable[[float], None] | None,
                cpu: CpuProbe | None = None) -> list[Window]:
    rng = random.Random(0)
    windows: list[Window] = []
    last_cpu: dict[str, float] = cpu() if cpu is not None else {}
    tasks: set[asyncio.Task[None]] = set()
    host, port = httpx.URL(url).host, httpx.URL(url).port or 80
    reqs = Requests(ConnPool(host, port))
    try:
        start = time.perf_counter()
        n = 0
        while True:
            now = time.perf_counter() - start
            if now >= seconds:
                break
            idx = int(now // window_s)
            while len(windows) <= idx:
                if windows:
                    _close_window(windows[-1], rss, cpu, last_cpu, window_s)
                windows.append(Window(len(windows), len(windows) * window_s))
                if tick is not None:
                    tick(min(now, seconds))
            w = windows[idx]
            w.sent += 1
            if len(tasks) >= MAX_IN_FLIGHT:
                w.errors["client_saturated"] = w.errors.get("client_saturated", 0) + 1
            else:
                task = asyncio.create_task(_one(reqs, rng, w, start + n / rate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            n += 1
            # Open loop: sleep until the next scheduled arrival, not for a fixed gap.
            delay = n / rate - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        if windows:
            _close_window(windows[-1], rss, cpu, last_cpu,
                          seconds - windows[-1].started_s or window_s)
    finally:
        reqs.pool.close()
    return windows


def verdict(windows: list[dict[str, Any]], warmup_windows: int) -> dict[str, Any]:
    steady = windows[warmup_windows:] or windows
    p99s = [w["p99_ms"] for w in steady if w["ok"]]
    med = statistics.median(p99s) if p99s else float("nan")
    rss0 = steady[0]["rss_mib"]
    rss_end = steady[-1]["rss_mib"]
    rss_max = max(w["rss_mib"] for w in steady)
    errors = sum(sum(w["errors"].values()) for w in windows)
    growth = (rss_end - rss0) / rss0 * 100 if rss0 else float("nan")
    return {
        "requests_ok": sum(w["ok"] for w in windows),
        "errors": errors,
        "p99_ms_median_window": round(med, 2),
        "p99_ms_worst_window": round(max(p99s), 2) if p99s else None,
        "p99_worst_over_median": round(max(p99s) / med, 2) if p99s and med else None,
        "rss_mib_after_warmup": rss0,
        "rss_mib_end": rss_end,
        "rss_mib_max": rss_max,
        "rss_growth_pct": round(growth, 2),
        "pass": errors == 0 and bool(p99s) and max(p99s) <= 3 * med and growth < 5.0,
    }


def run_soak(url: str, minutes: float, rate: float, window_s: float,
             rss: Callable[[], int] | None, tick: Callable[[float], None] | None = None,
             cpu: CpuProbe | None = None) -> dict[str, Any]:
    seconds = minutes * 60
    windows = asyncio.run(_soak(url, seconds, rate, window_s, rss, tick, cpu))
    summaries = [w.summary(window_s) for w in windows]
    warmup = max(1, int(round(min(60.0, seconds * 0.1) / window_s)))
    return {"minutes": minutes, "rate_offered": rate, "window_s": window_s,
            "warmup_windows": warmup, "windows": summaries, **verdict(summaries, warmup)}


def cpu_probe(**pids: int) -> CpuProbe:
    """CPU seconds (user + system) of each named child process and of this process ("client")."""
    import psutil

    procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    def probe() -> dict[str, float]:
        out = {"client": time.process_time()}
        for name, proc in procs.items():
            t = proc.cpu_times()
            out[name] = t.user + t.system
        return out

    return probe


@dataclass
class SoakArgs:
    minutes: float
    rate: float
    window_s: float


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    # 400: the sustained rate benchmarks/proxy_overhead.py measured (412 req/s), rounded down.
    parser.add_argument("--rate", type=float, default=400.0, help="offered requests per second")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per reported window")
    parser.add_argument("--quick", action="store_true", help="1 minute at 50 req/s, 10 s windows")
    args = parser.parse_args(argv)
    a = SoakArgs(args.minutes, args.rate, args.window)
    if args.quick:
        a = SoakArgs(1.0, 50.0, 10.0)
    console = Console(width=140)
    with calibserve_over_fake(in_process=False) as (srv, fake), Progress(console=console) as bar:
        task = bar.add_task(f"soak {a.minutes:g} min at {a.rate:g} req/s", total=a.minutes * 60)
        out = run_soak(srv.url, a.minutes, a.rate, a.window_s, srv.rss,
                       tick=lambda t: bar.update(task, completed=t),
                       cpu=cpu_probe(calibserve=srv.proc.pid, fake=fake.proc.pid))
        bar.update(task, completed=a.minutes * 60)
    table = Table(title="soak: calibserve (subprocess) over the FAKE upstream")
    for col in ("window", "from s", "ok", "rate/s", "errors", "p50 ms", "p99 ms", "RSS MiB",
                "load", "CPU % calibserve/client/fake"):
        table.add_column(col, justify="right")
    for w in out["windows"]:
        cpu = w["cpu_pct"]
        table.add_row(str(w["window"]), str(w["from_s"]), str(w["ok"]), str(w["rate_per_s"]),
                      str(sum(w["errors"].values())), str(w["p50_ms"]), str(w["p99_ms"]),
                      str(w["rss_mib"]), str(w["load1"]),
                      "/".join(f"{cpu.get(k, 0):.0f}" for k in ("calibserve", "client", "fake")))
    console.print(table)
    console.print({k: v for k, v in out.items() if k != "windows"})
    write_result("soak", {"config": asdict(a), **out})
    return 0 if out["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Proxy overhead: a fake upstream alone, and nginx, calibserve, LiteLLM's proxy and Portkey's
gateway in front of it.

All run side by side in one run on this machine, against the same FAKE upstream
(calibserve.testing.openai_upstream: canned OpenAI answers with logprobs, no model), so what differs
is only the proxy.
`bash benchmarks/peers/install.sh` installs the peers into `.peers/` (git-ignored);
a peer that is not installed is skipped with a line saying so. Peers are configured as their docs
recommend for production:

- nginx (the floor: a reverse proxy that does no work on the body): one worker, a keep-alive pool
  to the upstream, `access_log off`, `proxy_buffering off` (streams pass through as they come);
  its config is generated in the run's temporary folder;
- LiteLLM with one worker, `LITELLM_MODE=PRODUCTION`, a master key (1.106+ refuses to start
  without one), no database (so no spend tracking), spend and error logs off, the local cost map
  (no fetch at start), uvicorn's access log off (`--log_config`), httptools and uvloop installed
  beside it;
- Portkey's gateway (`--portkey DIR`, the npm package's folder) with `NODE_ENV=production`,
  headless, routed to the fake as an OpenAI-compatible provider (`x-portkey-provider: openai`,
  `x-portkey-custom-host`).

For each target it measures:

- added latency: p50/p99 of sequential request latency (one request in flight), minus the
  fake's own p50/p99;
- closed-loop rate and CPU per request: 16 connections sending back to back for
  `--step-seconds`, the target process tree's CPU time (utime + stime) over the requests answered;
- the concurrency sweep (`--concurrency`, default 1, 8, 64, 256 requests in flight, closed loop,
  `--step-seconds` each), non-streaming and streaming (`"stream": true`): req/s, p50/p99 latency,
  CPU per request of the target's process tree, and for streams the time to the first SSE `data:`
  event (p50/p99) and the per-chunk gap (median over streams of the mean gap between later
  events). The fake paces streamed events `--stream-interval-ms` apart (default 2 ms, 8 tokens:
  a stream lasts about 16 ms), like an engine emitting tokens, so a proxy that buffers a stream
  shows a first token as late as its last; each row also has what the target added to the
  fake's own row at the same concurrency (`added_p50_ms`, `added_ttft_p50_ms`,
  `added_per_chunk_ms`). The fake is one Python process: at 256 streams in flight its own pacing
  slips (its row shows by how much), which is why rows are compared with its row;
- sustained rate: the highest constant (open-loop) request rate it holds for `--step-seconds`
  with zero errors, every request answered within `--deadline` seconds and the offered rate
  actually achieved. The search starts at half the closed-loop rate; a failing step is repeated
  once (one late request at a loaded moment must not end the search), then rates go up by 1.5x
  until a step fails twice, and a binary search refines (each failing probe also repeated).

The load generator is a raw asyncio HTTP/1.1 client (benchmarks/rawhttp.py: keep-alive, pre-built
request bytes, a chunked SSE reader that only counts `data:` per chunk) so that it costs far less
CPU than the proxies it measures; its own CPU per request is in each sweep row
(`client_cpu_ms_per_request`). On a 2-core machine it still shares the CPU with them, which is
stated with the results. At the end it prints ratios against calibserve first (req/s:
calibserve / peer; CPU per request and added p50: peer / calibserve), then one row per target,
mode and concurrency; `--json FILE` writes everything (settings, machine, load average, every row
and every open-loop step).

Full run (all five targets, defaults; on 2 cores about 10-12 minutes, most of it the sweep's
40 steps and the open-loop searches):

    bash benchmarks/peers/install.sh
    .venv/bin/python -u benchmarks/proxy_overhead.py --json benchmarks/.work/proxy_overhead.json

Smoke run (seconds): `--only calibserve --warmup 20 --sequential 50 --step-seconds 0.3
--concurrency 1,8 --skip-sustained`; `--skip-sweep` leaves the sweep out.

Two calibserve builds side by side (a change against the commit before it):
`base=$(benchmarks/baseline_build.sh COMMIT)`, then `--only calibserve --baseline-python
$base/.venv/bin/python` adds the target `baseline` (that commit's calibserve in front of the same
fake) to every phase, and the ratios line `baseline` reads as the peers' do. For CPU per request
alone, in interleaved rounds (steadier on a shared machine), benchmarks/proxy_cpu.py.

Known: Portkey's gateway 1.15.2 answers every streamed chat request here with a 500
("TypeError: immutable" in its updateHeaders, on Node 20), so its stream rows are all errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: benchmarks/ itself is sys.path[0]
    sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    machine,
    pct,
    start,
    start_calibserve,
    start_fake,
    stop,
    tree_cpu,
    utc_now,
    wait_http,
    wait_tcp,
    write_json,
)
from benchmarks.rawhttp import Conn, Streamed, build_request  # noqa: E402

BODY = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "question : which colour is the sky ? A red "
                  "B blue C green D black"}],
    "max_tokens": 8,
    "temperature": 0,
}
STREAM_BODY = {**BODY, "stream": True}
PEERS = ("nginx", "litellm", "portkey")  # besides the fake (the baseline) and calibserve
SWEEP_CONCURRENCY = (1, 8, 64, 256)


@dataclass
class Target:
    name: str
    port: int
    path: str = "/v1/chat/completions"
    host: str = "127.0.0.1"
    raw: bytes = b""
    check: str = "choices"
    headers: dict[str, str] = field(default_factory=dict)
    pid: int | None = None  # the process (tree) whose CPU is counted
    raw_stream: bytes = b""

    def __post_init__(self) -> None:
        self.raw = build_request(self.host, self.port, self.path, BODY, self.headers)
        self.raw_stream = build_request(self.host, self.port, self.path, STREAM_BODY,
                                        self.headers)


async def sequential(target: Target, n: int) -> list[float]:
    conn = await Conn.open(target.host, target.port)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            status, body = await conn.request(target.raw)
            out.append(time.perf_counter() - t0)
            if status != 200 or target.check.encode() not in body:
                raise RuntimeError(f"{target.name}: bad answer {status} {body[:200]!r}")
    finally:
        conn.close()
    return out


async def stream_warmup(target: Target, n: int) -> int:
    """`n` streamed requests one after another (a proxy's streaming path has its own first-use
    costs); failures are not raised here, the sweep counts them. Returns how many succeeded."""
    conn = await Conn.open(target.host, target.port)
    ok = 0
    try:
        for _ in range(n):
            got = await conn.stream(target.raw_stream)
            ok += got.status == 200 and got.done
    except (OSError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        conn.close()
    return ok


async def open_loop(target: Target, rate: float, seconds: float, deadline: float,
                    max_conns: int = 512) -> dict[str, Any]:
    """Offer `rate` requests/s for `seconds`; count errors and late answers."""
    pool: list[Conn] = []
    opened = 0
    latencies: list[float] = []
    errors = 0
    late = 0
    total = int(rate * seconds)
    start = time.perf_counter() + 0.05
    done_at: list[float] = []

    async def one(i: int) -> None:
        nonlocal opened, errors, late
        when = start + i / rate
        delay = when - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if pool:
            conn = pool.pop()
        elif opened < max_conns:
            opened += 1
            try:
                conn = await Conn.open(target.host, target.port)
            except OSError:
                errors += 1
                return
        else:
            # No free connection: wait for one (counts against the latency as queueing).
            while not pool:
                await asyncio.sleep(0.0005)
                if time.perf_counter() - when > deadline:
                    late += 1
                    return
            conn = pool.pop()
        try:
            status, body = await asyncio.wait_for(conn.request(target.raw),
                                                  deadline - (time.perf_counter() - when))
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            conn.close()
            return
        latency = time.perf_counter() - when
        latencies.append(latency)
        done_at.append(time.perf_counter())
        if status != 200 or target.check.encode() not in body:
            errors += 1
        elif latency > deadline:
            late += 1
        pool.append(conn)

    await asyncio.gather(*(one(i) for i in range(total)))
    for conn in pool:
        conn.close()
    elapsed = (max(done_at) - start) if done_at else seconds
    latencies.sort()
    return {
        "rate": rate, "requests": total, "errors": errors, "late": late,
        "achieved": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
    }


def held(result: dict[str, Any]) -> bool:
    return bool(result["errors"] == 0 and result["late"] == 0
                and result["achieved"] >= 0.95 * result["rate"])


async def settle(target: Target, quick: float, limit: float = 60.0) -> None:
    """Wait until an overloaded target has drained its backlog, so steps do not poison each
    other: five sequential answers in a row, each within `quick` seconds."""
    deadline = time.monotonic() + limit
    await asyncio.sleep(0.5)
    while time.monotonic() < deadline:
        try:
            if max(await asyncio.wait_for(sequential(target, 5), 10)) < quick:
                return
        except (TimeoutError, OSError, RuntimeError, asyncio.IncompleteReadError):
            pass
        await asyncio.sleep(1.0)


async def held_twice(target: Target, rate: float, seconds: float, deadline: float,
                     quick: float, steps: list[dict[str, Any]], log: Any) -> bool:
    """Does `target` hold `rate`? A failing step is repeated once after the target drained."""
    for attempt in (1, 2):
        r = await open_loop(target, rate, seconds, deadline)
        r["attempt"] = attempt
        steps.append(r)
        log(f"  {target.name:10s} {rate:8.0f}/s -> {_fmt(r)}")
        await settle(target, quick)
        if held(r):
            return True
    return False


async def max_rate(target: Target, seconds: float, deadline: float, start: float,
                   quick: float, log: Any) -> tuple[float, list[dict[str, Any]]]:
    """From `start`: down by half until a rate holds, up by 1.5x until one does not, then 3
    bisection steps; every verdict of "not held" is confirmed by a repeat."""
    steps: list[dict[str, Any]] = []
    rate = start
    while not await held_twice(target, rate, seconds, deadline, quick, steps, log):
        rate /= 2
        if rate < 1:
            return 0.0, steps
    good, bad = rate, None
    while bad is None and rate < 20000:
        rate *= 1.5
        if await held_twice(target, rate, seconds, deadline, quick, steps, log):
            good = rate
        else:
            bad = rate
    if bad is None:
        return good, steps
    for _ in range(3):
        mid = (good + bad) / 2
        if await held_twice(target, mid, seconds, deadline, quick, steps, log):
            good = mid
        else:
            bad = mid
    return good, steps


async def closed_loop(target: Target, conns: int, seconds: float) -> tuple[int, float]:
    """`conns` connections back to back for `seconds`: (answers, wall seconds)."""
    pool = [await Conn.open(target.host, target.port) for _ in range(conns)]
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker(conn: Conn) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            status, body = await conn.request(target.raw)
            if status != 200 or target.check.encode() not in body:
                raise RuntimeError(f"{target.name}: bad answer {status} {body[:200]!r}")
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in pool))
    wall = time.perf_counter() - t0
    for c in pool:
        c.close()
    return done, wall


# -- the concurrency sweep ------------------------------------------------------------------------

def _pct_ms(values: list[float], q: float) -> float | None:
    return 1000 * pct(values, q) if values else None


async def sweep_step(target: Target, conns: int, seconds: float, stream: bool,
                     grace: float = 30.0) -> dict[str, Any]:
    """`conns` requests in flight (closed loop: each connection sends its next request when the
    last is answered) for `seconds`. Latency is request written to answer read; for a stream,
    also the time to the first `data:` event and the mean gap between later events. A failed
    request counts as an error (its connection is reopened); a step still running `grace`
    seconds after its end is cut off (`cut_off`). CPU: the target's process tree over the step,
    and this load generator's own (so a reader can see whether the client kept up)."""
    raw = target.raw_stream if stream else target.raw
    check = target.check.encode()
    latencies: list[float] = []
    ttfts: list[float] = []
    gaps: list[float] = []
    errors = 0
    pool = list(await asyncio.gather(*(Conn.open(target.host, target.port)
                                       for _ in range(conns))))
    cpu0 = tree_cpu(target.pid) if target.pid else 0.0
    client0 = time.process_time()
    t0 = time.perf_counter()
    stop_at = t0 + seconds

    async def worker(slot: int) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            conn = pool[slot]
            try:
                if stream:
                    got: Streamed = await conn.stream(raw)
                    ok = got.status == 200 and got.events >= 2 and got.done
                    if ok:
                        latencies.append(got.total)
                        ttfts.append(got.ttft)
                        gaps.append(got.per_chunk)
                else:
                    sent = time.perf_counter()
                    status, body = await conn.request(raw)
                    ok = status == 200 and check in body
                    if ok:
                        latencies.append(time.perf_counter() - sent)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                ok = False
                conn.close()
                try:
                    pool[slot] = await Conn.open(target.host, target.port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
            if not ok:
                errors += 1
                await asyncio.sleep(0.01)  # a target answering errors must not spin the client

    cut_off = False
    try:
        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(conns))),
                               seconds + grace)
    except TimeoutError:
        cut_off = True
    wall = time.perf_counter() - t0
    client = time.process_time() - client0
    cpu = (tree_cpu(target.pid) - cpu0) if target.pid else 0.0
    for conn in pool:
        conn.close()
    n = len(latencies)
    row: dict[str, Any] = {
        "concurrency": conns, "stream": stream, "seconds": wall, "requests": n,
        "errors": errors, "cut_off": cut_off, "rps": n / wall if wall > 0 else 0.0,
        "p50_ms": _pct_ms(latencies, 0.5), "p99_ms": _pct_ms(latencies, 0.99),
        "cpu_ms_per_request": 1000 * cpu / n if n and target.pid else None,
        "client_cpu_ms_per_request": 1000 * client / n if n else None,
    }
    if stream:
        row.update({"ttft_p50_ms": _pct_ms(ttfts, 0.5), "ttft_p99_ms": _pct_ms(ttfts, 0.99),
                    "per_chunk_ms": _pct_ms(gaps, 0.5), "per_chunk_p99_ms": _pct_ms(gaps, 0.99)})
    return row


def sweep(targets: list[Target], concurrency: list[int], seconds: float, log: Any,
          stream_modes: tuple[bool, ...] = (False, True)) -> dict[str, Any]:
    """Every target at every concurrency, non-streaming then streaming. Where the fake (the
    baseline) is among the targets, each row also gets what the target added to it:
    `added_p50_ms`, and for streams `added_ttft_p50_ms` and `added_per_chunk_ms`."""
    out: dict[str, Any] = {}
    for t in targets:
        for stream in stream_modes:
            mode = "stream" if stream else "non_stream"
            for c in concurrency:
                row = asyncio.run(sweep_step(t, c, seconds, stream))
                out.setdefault(t.name, {}).setdefault(mode, {})[str(c)] = row
                log(f"  {t.name:10s} {mode:10s} {c:4d} in flight  {_fmt_sweep(row)}")
    base = out.get("fake")
    if base:
        for modes in out.values():
            for mode, rows in modes.items():
                for c, row in rows.items():
                    ref = base.get(mode, {}).get(c)
                    if not ref:
                        continue
                    for key, added in (("p50_ms", "added_p50_ms"),
                                       ("ttft_p50_ms", "added_ttft_p50_ms"),
                                       ("per_chunk_ms", "added_per_chunk_ms")):
                        if row.get(key) is not None and ref.get(key) is not None:
                            row[added] = row[key] - ref[key]
    return out


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_sweep(r: dict[str, Any]) -> str:
    line = (f"{r['rps']:8.0f} req/s  p50 {_f(r['p50_ms'])} p99 {_f(r['p99_ms'])} ms  "
            f"CPU {_f(r['cpu_ms_per_request'], 3)} ms/req  errors {r['errors']}")
    if r["stream"]:
        line += (f"  TTFT p50 {_f(r['ttft_p50_ms'])} p99 {_f(r['ttft_p99_ms'])} ms  "
                 f"chunk gap {_f(r['per_chunk_ms'], 3)} ms")
    return line + ("  CUT OFF" if r["cut_off"] else "")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def summary_table(results: dict[str, Any]) -> list[str]:
    """Ratios against calibserve first, then one compact row per target, mode and concurrency."""
    lines: list[str] = []
    sw = results.get("sweep") or {}
    targets = results.get("targets", {})
    cs_seq = targets.get("calibserve")
    peers = [p for p in (*PEERS, "baseline") if p in targets or p in sw]
    if cs_seq is not None and peers:
        lines.append("calibserve vs each peer (req/s: calibserve / peer, higher is better for "
                     "calibserve; CPU per request and added p50: peer / calibserve, likewise):")
        for peer in peers:
            other = targets.get(peer, {})
            added = _ratio(other.get("added_p50_ms"), cs_seq.get("added_p50_ms"))
            cpu = _ratio(other.get("cpu_ms_per_request"), cs_seq.get("cpu_ms_per_request"))
            parts = [f"added p50 {added}", f"CPU/req {cpu}"]
            if cs_seq.get("sustained_rps") is not None:
                held_ratio = _ratio(cs_seq.get("sustained_rps"), other.get("sustained_rps"))
                parts.append(f"sustained {held_ratio}")
            for mode in ("non_stream", "stream"):
                rows_cs = sw.get("calibserve", {}).get(mode, {})
                rows_p = sw.get(peer, {}).get(mode, {})
                for c, row in rows_cs.items():
                    if c in rows_p:
                        tag = "s" if mode == "stream" else ""
                        rps = _ratio(row["rps"], rows_p[c]["rps"])
                        cpu = _ratio(rows_p[c]["cpu_ms_per_request"], row["cpu_ms_per_request"])
                        parts.append(f"{tag}{c}: {rps} rps {cpu} cpu")
            lines.append(f"  {peer:8s} " + ", ".join(parts))
    if sw:
        lines.append(f"{'target':10s} {'mode':10s} {'c':>4s} {'req/s':>8s} {'p50':>7s} "
                     f"{'p99':>7s} {'ttft50':>7s} {'ttft99':>7s} {'chunk':>6s} {'cpu/req':>7s} "
                     f"{'err':>4s}  (ms)")
        for name, modes in sw.items():
            for mode, rows in modes.items():
                for c, r in rows.items():
                    lines.append(
                        f"{name:10s} {mode:10s} {c:>4s} {r['rps']:8.0f} {_f(r['p50_ms']):>7s} "
                        f"{_f(r['p99_ms']):>7s} {_f(r.get('ttft_p50_ms')):>7s} "
                        f"{_f(r.get('ttft_p99_ms')):>7s} {_f(r.get('per_chunk_ms'), 3):>6s} "
                        f"{_f(r['cpu_ms_per_request'], 3):>7s} {r['errors']:4d}")
    return lines


def _fmt(r: dict[str, Any]) -> str:
    p50 = f"{r['p50_ms']:.1f}" if r["p50_ms"] is not None else "-"
    p99 = f"{r['p99_ms']:.1f}" if r["p99_ms"] is not None else "-"
    return (f"achieved {r['achieved']:7.0f}/s errors {r['errors']} late {r['late']} "
            f"p50 {p50} ms p99 {p99} ms {'OK' if held(r) else 'FAIL'}")


# -- peers ----------------------------------------------------------------------------------------

def start_litellm(binary: str, fake_port: int, port: int, work: Path) -> subprocess.Popen[bytes]:
    """LiteLLM's proxy as its production docs recommend, minus what needs a database."""
    config = work / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: fake-model\n"
        "    litellm_params:\n"
        "      model: openai/fake-model\n"
        f"      api_base: http://127.0.0.1:{fake_port}/v1\n"
        "      api_key: sk-fake\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "  set_verbose: false\n"
        "  request_timeout: 600\n"
        "general_settings:\n"
        # LiteLLM 1.106+ refuses to start without a master key (as production would have); the
        # load generator sends `Bearer sk-bench`.
        "  master_key: sk-bench\n"
        "  disable_spend_logs: true\n"
        "  disable_error_logs: true\n"
    )
    log_config = work / "litellm-logging.json"  # uvicorn's access log off (a line per request)
    log_config.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "loggers": {"uvicorn.access": {"level": "WARNING"}, "uvicorn.error": {"level": "INFO"}},
    }))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_MODE": "PRODUCTION"}
    return start([binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                  "--num_workers", "1", "--log_config", str(log_config)],
                 work / "litellm.log", env=env)


def start_nginx(binary: str, fake_port: int, port: int, work: Path) -> subprocess.Popen[bytes]:
    """nginx as a plain reverse proxy to the fake (the floor: it does no work on the body): one
    worker, keep-alive pool to the upstream, no access log, no buffering (streams pass through
    as they come). Config, pid, temp folders and logs live in `work`."""
    conf = work / "nginx.conf"
    temp = work / "nginx-temp"
    temp.mkdir(exist_ok=True)
    conf.write_text(f"""\
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 1000000;
    upstream fake {{
        server 127.0.0.1:{fake_port};
        keepalive 512;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
""")
    return start([binary, "-p", str(work), "-e", str(work / "nginx-error.log"), "-c", str(conf)],
                 work / "nginx.log")


def find_nginx() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def start_targets(args: argparse.Namespace, wanted: set[str], ports: list[int], work: Path,
                  procs: list[subprocess.Popen[bytes]], log: Any) -> list[Target]:
    """Start the fake and every wanted target that is installed (appending each process to
    `procs`, which the caller stops); the targets in order fake, calibserve, baseline (with
    `--baseline-python`), nginx, litellm, portkey."""
    fake_port, cs_port, ll_port, pk_port = ports[:4]
    ng_port = ports[4] if len(ports) > 4 else pk_port + 1
    bl_port = ports[5] if len(ports) > 5 else ng_port + 1
    fake = start_fake(fake_port, work / "fake.log",
                      "--stream-interval-ms", str(args.stream_interval_ms))
    procs.append(fake)
    targets = [Target("fake", fake_port, pid=fake.pid)]
    upstream = ["--upstream", f"http://127.0.0.1:{fake_port}", "--served-model-name", "fake-model"]
    if "calibserve" in wanted:
        cs = start_calibserve(cs_port, work / "calibserve.log", upstream)
        procs.append(cs)
        targets.append(Target("calibserve", cs_port, pid=cs.pid))
    if args.baseline_python:  # another build, from its own venv
        bl = start_calibserve(bl_port, work / "baseline.log", upstream,
                              python=args.baseline_python, timeout=90)
        procs.append(bl)
        targets.append(Target("baseline", bl_port, pid=bl.pid))
    if "nginx" in wanted and Path(args.nginx).exists():
        ng = start_nginx(args.nginx, fake_port, ng_port, work)
        procs.append(ng)
        wait_http(ng_port, "/health", 20, ng)
        targets.append(Target("nginx", ng_port, pid=ng.pid))
    elif "nginx" in wanted:
        log(f"nginx not found at {args.nginx}: skipping it (benchmarks/peers/install.sh)")
    if "litellm" in wanted and Path(args.litellm).exists():
        ll = start_litellm(args.litellm, fake_port, ll_port, work)
        procs.append(ll)
        wait_http(ll_port, "/health/liveliness", 180, ll)
        targets.append(Target("litellm", ll_port, pid=ll.pid))
    elif "litellm" in wanted:
        log(f"LiteLLM not found at {args.litellm}: skipping it (benchmarks/peers/install.sh)")
    gateway = Path(args.portkey) / "build" / "start-server.js"
    if "portkey" in wanted and gateway.exists():
        pk = start(["node", str(gateway), "--headless", f"--port={pk_port}"],
                   work / "portkey.log", env={**os.environ, "NODE_ENV": "production"})
        procs.append(pk)
        wait_tcp(pk_port, 60, pk)
        targets.append(Target("portkey", pk_port, pid=pk.pid, headers={
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": f"http://127.0.0.1:{fake_port}/v1"}))
    elif "portkey" in wanted:
        log(f"Portkey's gateway not found at {args.portkey}: skipping it "
            "(benchmarks/peers/install.sh)")
    return targets


def headline_ratios(targets: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`calibserve_vs_PEER`: calibserve's sustained rate / the peer's, its added p50 / the
    peer's (the keys the earlier runs' JSON had), for each peer that ran."""
    cs_row = targets.get("calibserve")
    out: dict[str, dict[str, float]] = {}
    for peer in (*PEERS, "baseline"):
        other = targets.get(peer)
        if not (cs_row and other):
            continue
        vs: dict[str, float] = {}
        if other.get("sustained_rps"):
            vs["sustained_rate"] = cs_row["sustained_rps"] / other["sustained_rps"]
        if other["added_p50_ms"]:
            vs["added_p50"] = cs_row["added_p50_ms"] / other["added_p50_ms"]
        out[f"calibserve_vs_{peer}"] = vs
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="calibserve vs nginx, LiteLLM's proxy and Portkey's "
                                 "gateway, in front of one FAKE upstream")
    ap.add_argument("--litellm", default=str(REPO / ".peers" / "litellm" / "bin" / "litellm"))
    ap.add_argument("--portkey", default=str(REPO / ".peers" / "portkey" / "node_modules"
                                             / "@portkey-ai" / "gateway"))
    ap.add_argument("--nginx", default=find_nginx(), help="the nginx binary")
    ap.add_argument("--only", default=None,
                    help="comma-separated targets to run among calibserve,nginx,litellm,portkey "
                    "(the fake, the baseline, always runs)")
    ap.add_argument("--warmup", type=int, default=3000, help="requests per target first "
                    "(Portkey's JIT needs about 3,000 before its latency settles)")
    ap.add_argument("--ports", default="18320,18321,18322,18323,18324,18325",
                    help="fake,calibserve,litellm,portkey[,nginx[,baseline]]")
    ap.add_argument("--baseline-python", default=None,
                    help="also run another calibserve build, target `baseline`, with this "
                    "interpreter (its venv; benchmarks/baseline_build.sh COMMIT makes one): "
                    "every phase measures both builds side by side")
    ap.add_argument("--sequential", type=int, default=2000)
    ap.add_argument("--step-seconds", type=float, default=4.0,
                    help="length of each closed-loop, sweep and open-loop step")
    ap.add_argument("--deadline", type=float, default=1.0)
    ap.add_argument("--concurrency", default=",".join(map(str, SWEEP_CONCURRENCY)),
                    help="the sweep's requests in flight")
    ap.add_argument("--stream-interval-ms", type=float, default=2.0,
                    help="the fake paces streamed events this far apart, like an engine "
                    "emitting a token every N ms (0: a whole stream in one write)")
    ap.add_argument("--skip-sweep", action="store_true", help="no concurrency sweep")
    ap.add_argument("--skip-sustained", action="store_true", help="no open-loop rate search")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    ports = [int(p) for p in args.ports.split(",")]
    wanted = set(args.only.split(",")) if args.only else {"calibserve", *PEERS}
    if args.baseline_python and not Path(args.baseline_python).exists():
        raise SystemExit(f"--baseline-python: {args.baseline_python} does not exist")
    unknown = wanted - {"calibserve", "fake", *PEERS}
    if unknown:
        raise SystemExit(f"--only: unknown target(s) {sorted(unknown)}")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    procs: list[subprocess.Popen[bytes]] = []

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        targets = start_targets(args, wanted, ports, work, procs, log)
        results: dict[str, Any] = {
            "machine": machine(), "date": utc_now(),
            "load_average_start": os.getloadavg(), "settings": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "targets": {}}
        log(f"machine: {results['machine']}")
        for t in targets:  # warm up (imports, connection pools, caches, JIT)
            asyncio.run(sequential(t, args.warmup))
            if not args.skip_sweep:  # and the streaming path, a tenth as many
                asyncio.run(stream_warmup(t, max(1, args.warmup // 10)))
        log("sequential latency (one request in flight):")
        seq: dict[str, list[float]] = {}
        for t in targets:
            seq[t.name] = asyncio.run(sequential(t, args.sequential))
        base50, base99 = pct(seq["fake"], 0.5), pct(seq["fake"], 0.99)
        for t in targets:
            p50, p99 = pct(seq[t.name], 0.5), pct(seq[t.name], 0.99)
            results["targets"][t.name] = {
                "p50_ms": 1000 * p50, "p99_ms": 1000 * p99,
                "mean_ms": 1000 * statistics.fmean(seq[t.name]),
                "added_p50_ms": 1000 * (p50 - base50), "added_p99_ms": 1000 * (p99 - base99),
            }
            log(f"  {t.name:10s} p50 {1000 * p50:7.3f} ms  p99 {1000 * p99:7.3f} ms  "
                f"added p50 {1000 * (p50 - base50):7.3f} ms  p99 {1000 * (p99 - base99):7.3f} ms")
        log("closed loop (16 connections) and CPU per request:")
        for t in targets:
            c0 = tree_cpu(t.pid) if t.pid else 0.0
            n, wall = asyncio.run(closed_loop(t, 16, args.step_seconds))
            cpu = (tree_cpu(t.pid) - c0) if t.pid else 0.0
            row = results["targets"][t.name]
            row["closed_loop_rps"] = n / wall
            row["cpu_ms_per_request"] = 1000 * cpu / n
            log(f"  {t.name:10s} {n / wall:8.0f} req/s  CPU {1000 * cpu / n:.3f} ms/request")
        if not args.skip_sweep:
            log(f"concurrency sweep (closed loop, {args.step_seconds:g}s per step, "
                f"{','.join(map(str, concurrency))} in flight, non-streaming and streaming):")
            results["sweep"] = sweep(targets, concurrency, args.step_seconds, log)
        if not args.skip_sustained:
            log(f"sustained rate (open loop, {args.step_seconds:g}s steps, deadline "
                f"{args.deadline:g}s, zero errors):")
            for t in targets:
                p50 = pct(seq[t.name], 0.5)
                first = max(5.0, 0.5 * results["targets"][t.name]["closed_loop_rps"])
                quick = 3 * p50 + 0.005
                rate, steps = asyncio.run(
                    max_rate(t, args.step_seconds, args.deadline, first, quick, log))
                results["targets"][t.name]["sustained_rps"] = rate
                results["targets"][t.name]["steps"] = steps
                log(f"  {t.name:10s} sustained {rate:.0f} req/s")
        results.update(headline_ratios(results["targets"]))
        results["load_average_end"] = os.getloadavg()
        log("")
        for line in summary_table(results):
            log(line)
        if args.json:
            write_json(args.json, results)
            log(f"results: {args.json}")
        return results
    finally:
        for p in reversed(procs):
            stop(p)


if __name__ == "__main__":
    main()

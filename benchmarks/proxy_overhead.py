"""Proxy overhead: a fake upstream alone, calibserve in front of it, LiteLLM's proxy in front of it.

All three run side by side in one run on this machine, against the same FAKE upstream
(tests/fakes/openai_upstream.py: canned OpenAI answers with logprobs, no model), so what differs is
only the proxy. For each target it measures:

- added latency: p50/p99 of sequential request latency (one request in flight), minus the
  fake's own p50/p99;
- sustained rate: the highest constant (open-loop) request rate it holds for `--step-seconds`
  with zero errors, every request answered within `--deadline` seconds and the offered rate
  actually achieved. Rates go up by 1.5x until a failure, then a binary search refines.

The load generator is a raw asyncio HTTP/1.1 client (keep-alive, pre-built request bytes) so that
it costs far less CPU than the proxies it measures; on a 2-core machine it still shares the CPU
with them, which is stated with the results.

    .venv/bin/python benchmarks/proxy_overhead.py [--litellm .venv-litellm/bin/litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BODY = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "question : which colour is the sky ? A red "
                  "B blue C green D black"}],
    "max_tokens": 8,
    "temperature": 0,
}


try:
    from benchmarks.rawhttp import Conn, build_request
except ModuleNotFoundError:  # run as a script: benchmarks/ itself is sys.path[0]
    from rawhttp import Conn, build_request  # type: ignore[no-redef]


@dataclass
class Target:
    name: str
    port: int
    path: str = "/v1/chat/completions"
    host: str = "127.0.0.1"
    raw: bytes = b""
    check: str = "choices"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.raw = build_request(self.host, self.port, self.path, BODY)


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
    return (result["errors"] == 0 and result["late"] == 0
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


async def max_rate(target: Target, seconds: float, deadline: float, start: float,
                   quick: float, log: Any) -> tuple[float, list[dict[str, Any]]]:
    """Rates up by 1.5x from `start` until one is not held, then 3 bisection steps."""
    steps: list[dict[str, Any]] = []
    rate, good, bad = start, 0.0, None
    while bad is None and rate < 20000:
        r = await open_loop(target, rate, seconds, deadline)
        steps.append(r)
        log(f"  {target.name:10s} {rate:8.0f}/s -> {_fmt(r)}")
        if held(r):
            good, rate = rate, rate * 1.5
        else:
            bad = rate
        await settle(target, quick)
    if bad is None:
        return good, steps
    for _ in range(3):
        mid = (good + bad) / 2
        r = await open_loop(target, mid, seconds, deadline)
        steps.append(r)
        log(f"  {target.name:10s} {mid:8.0f}/s -> {_fmt(r)}")
        if held(r):
            good = mid
        else:
            bad = mid
        await settle(target, quick)
    return good, steps


def _fmt(r: dict[str, Any]) -> str:
    p50 = f"{r['p50_ms']:.1f}" if r["p50_ms"] is not None else "-"
    p99 = f"{r['p99_ms']:.1f}" if r["p99_ms"] is not None else "-"
    return (f"achieved {r['achieved']:7.0f}/s errors {r['errors']} late {r['late']} "
            f"p50 {p50} ms p99 {p99} ms {'OK' if held(r) else 'FAIL'}")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- processes ----------------------------------------------------------------------------------

def wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"nothing healthy on port {port} after {timeout}s")


def start(cmd: list[str], log_path: Path, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def main() -> None:
    ap = argparse.ArgumentParser(description="calibserve vs LiteLLM proxy overhead")
    ap.add_argument("--litellm", default=str(REPO / ".venv-litellm" / "bin" / "litellm"))
    ap.add_argument("--ports", default="18320,18321,18322", help="fake,calibserve,litellm")
    ap.add_argument("--sequential", type=int, default=2000)
    ap.add_argument("--step-seconds", type=float, default=5.0)
    ap.add_argument("--deadline", type=float, default=1.0)
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    args = ap.parse_args()
    fake_port, cs_port, ll_port = (int(p) for p in args.ports.split(","))
    work = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    procs: list[subprocess.Popen[bytes]] = []

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        fake = start([sys.executable, str(REPO / "tests" / "fakes" / "openai_upstream.py"),
                      "--port", str(fake_port)], work / "fake.log")
        procs.append(fake)
        wait_http(fake_port, "/health", 20, fake)
        cs = start([sys.executable, "-m", "calibserve.server", "serve", "--upstream",
                    f"http://127.0.0.1:{fake_port}", "--served-model-name", "fake-model",
                    "--host", "127.0.0.1", "--port", str(cs_port), "--signing-key", "bench",
                    "--log-level", "warning"], work / "calibserve.log",
                   env={**os.environ, "PYTHONPATH": str(REPO)})
        procs.append(cs)
        wait_http(cs_port, "/health", 60, cs)
        targets = [Target("fake", fake_port), Target("calibserve", cs_port)]
        if Path(args.litellm).exists():
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
            )
            env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
            ll = start([args.litellm, "--config", str(config), "--host", "127.0.0.1",
                        "--port", str(ll_port), "--num_workers", "1"], work / "litellm.log",
                       env=env)
            procs.append(ll)
            wait_http(ll_port, "/health/liveliness", 180, ll)
            targets.append(Target("litellm", ll_port))
        else:
            log(f"LiteLLM not found at {args.litellm}: skipping it")

        results: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                   "targets": {}}
        log(f"machine: {results['machine']}")
        for t in targets:  # warm up (imports, connection pools, caches)
            asyncio.run(sequential(t, 200))
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
        log(f"sustained rate (open loop, {args.step_seconds:g}s steps, deadline "
            f"{args.deadline:g}s, zero errors):")
        for t in targets:
            # Start well below what one-at-a-time latency allows, so the first step holds.
            p50 = pct(seq[t.name], 0.5)
            first = max(5.0, min(200.0, 0.25 / p50))
            quick = 3 * p50 + 0.005
            rate, steps = asyncio.run(
                max_rate(t, args.step_seconds, args.deadline, first, quick, log))
            results["targets"][t.name]["sustained_rps"] = rate
            results["targets"][t.name]["steps"] = steps
            log(f"  {t.name:10s} sustained {rate:.0f} req/s")
        cs_rate = results["targets"]["calibserve"]["sustained_rps"]
        if "litellm" in results["targets"]:
            ll_rate = results["targets"]["litellm"]["sustained_rps"]
            results["calibserve_vs_litellm_rate"] = cs_rate / ll_rate if ll_rate else None
            ratio = results["calibserve_vs_litellm_rate"]
            log(f"calibserve / LiteLLM sustained rate: {ratio:.2f}x")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        for p in reversed(procs):
            stop(p)


if __name__ == "__main__":
    main()

"""CPU per proxied request: calibserve now against a baseline build, side by side in one run.

The floor (issue 17): at most 0.8 ms of calibserve's own CPU per non-streaming request, and
per streamed chunk, with confidence, signed id and metrics on every answer. In front of the
FAKE upstream (calibserve.testing.openai_upstream: canned answers with logprobs, no model), each
calibserve process is loaded with the raw keep-alive client (rawhttp.py), one connection
(sequential) and 16 connections (closed loop), non-streaming and streaming chat completions;
its CPU time (utime + stime from /proc) over the requests answered. Rounds interleave the
targets so both see the same machine; medians are reported.

    .venv/bin/python benchmarks/proxy_cpu.py [--baseline-python /path/to/base/.venv/bin/python]

With no calibration calibserve scores the fake's 8-token replies by its default method. The
option-letter traffic of engine_cost.py (the `answer` method: 5 alternatives on each of 32
tokens) is `--tokens 32 --calibration MERGED/model/calibration.json`.

The baseline is any other calibserve build importable by that interpreter (for example a
`git archive` of main with its own strict editable install).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: benchmarks/ itself is sys.path[0]
    sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    cpu_seconds,
    loadavg,
    run_file,
    stamp,
    start_calibserve,
    start_fake,
    stop,
    write_json,
)
from benchmarks.proxy_overhead import BODY  # noqa: E402
from benchmarks.rawhttp import Conn, build_request  # noqa: E402

CASES = (("json", 1), ("json", 16), ("stream", 1), ("stream", 16))


async def load(port: int, raw: bytes, conns: int, n: int) -> tuple[int, int]:
    """`n` requests over `conns` connections; (answered, SSE events seen)."""
    pool = [await Conn.open("127.0.0.1", port) for _ in range(conns)]
    events = 0

    async def worker(conn: Conn, count: int) -> None:
        nonlocal events
        for _ in range(count):
            status, body = await conn.request(raw)
            if status != 200 or b"confidence" not in body:
                raise RuntimeError(f"bad answer {status}: {body[:200]!r}")
            events += body.count(b"data: ")

    per = n // conns
    await asyncio.gather(*(worker(c, per) for c in pool))
    for c in pool:
        c.close()
    return per * conns, events


def measure(port: int, proc: Any, kind: str, conns: int, requests: int) -> dict[str, Any]:
    """One load on one calibserve: its rate and CPU per request (and per SSE event)."""
    raw = build_request("127.0.0.1", port, "/v1/chat/completions",
                        {**BODY, "stream": kind == "stream"})
    c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
    n, events = asyncio.run(load(port, raw, conns, requests))
    c1, t1 = cpu_seconds(proc.pid), time.perf_counter()
    return {"requests": n, "rps": n / (t1 - t0), "cpu_ms_per_request": 1000 * (c1 - c0) / n,
            "cpu_ms_per_chunk": 1000 * (c1 - c0) / events if events else None}


def medians(runs: list[dict[str, Any]], targets: list[str]) -> dict[str, dict[str, float]]:
    """Each figure's median over the rounds, per target and case; printed as well."""
    summary: dict[str, dict[str, float]] = {}
    for kind, conns in CASES:
        for name in targets:
            rows = [r for r in runs if r["target"] == name
                    and r["kind"] == kind and r["connections"] == conns]
            key = f"{name} {kind} x{conns}"
            fields = ["cpu_ms_per_request", "rps"]
            fields += ["cpu_ms_per_chunk"] if kind == "stream" else []
            summary[key] = {f: statistics.median(r[f] for r in rows) for f in fields}
            print(f"{key:32s} " + "  ".join(f"{k} {v:.3f}" for k, v in summary[key].items()))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-python", default=None)
    ap.add_argument("--baseline-label", default="baseline")
    ap.add_argument("--ports", default="18340,18341,18342", help="fake,calibserve,baseline")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8, help="tokens per fake reply")
    ap.add_argument("--calibration", type=Path, default=None,
                    help="calibration.json for the served model (default: none)")
    ap.add_argument("--json", type=Path, default=None,
                    help="every round's rows and the medians (default: a new file in "
                    "$CALIBSERVE_HOME/benchmarks/proxy_cpu/)")
    args = ap.parse_args()
    if args.calibration is not None and not args.calibration.is_file():
        ap.error(f"--calibration: no file {args.calibration}")
    fake_port, cs_port, base_port = (int(p) for p in args.ports.split(","))
    work = Path(tempfile.mkdtemp(prefix="proxy-cpu-"))
    procs = []
    try:
        procs.append(start_fake(fake_port, work / "fake.log", "--tokens", str(args.tokens)))
        targets: dict[str, tuple[int, Any]] = {}
        pythons = [("calibserve", sys.executable, cs_port)]
        if args.baseline_python:
            pythons.append((args.baseline_label, args.baseline_python, base_port))
        upstream = ["--upstream", f"http://127.0.0.1:{fake_port}", "--served-model-name",
                    "fake-model"]
        if args.calibration is not None:
            config = work / "serve.yaml"
            config.write_text(json.dumps({"models": [{
                "name": "fake-model", "upstreams": [f"http://127.0.0.1:{fake_port}"],
                "calibration": str(args.calibration.resolve())}]}))
            upstream = ["--config", str(config)]
        for name, python, port in pythons:
            proc = start_calibserve(port, work / f"{name}.log", upstream, python=python)
            procs.append(proc)
            targets[name] = (port, proc)
        now = stamp()
        results: dict[str, Any] = {"machine": now["machine"], "date": now["date"],
                                   "load_average_start": now["load_average"], "runs": []}
        print(f"machine: {now['machine']}; load average {now['load_average']}", flush=True)
        for port, _proc in targets.values():  # warm-up
            for kind, _conns in CASES:
                raw = build_request("127.0.0.1", port, "/v1/chat/completions",
                                    {**BODY, "stream": kind == "stream"})
                asyncio.run(load(port, raw, 4, 400))
        for rnd in range(args.rounds):
            for kind, conns in CASES:
                for name, (port, proc) in targets.items():
                    run = {"target": name, "kind": kind, "connections": conns, "round": rnd,
                           **measure(port, proc, kind, conns, args.requests)}
                    results["runs"].append(run)
                    per_chunk = (f", {run['cpu_ms_per_chunk']:.3f} ms/chunk"
                                 if kind == "stream" else "")
                    print(f"  {name:12s} {kind:6s} x{conns:<2d} {run['rps']:7.0f} req/s  CPU "
                          f"{run['cpu_ms_per_request']:.3f} ms/request{per_chunk}",
                          flush=True)
        results["load_average_end"] = loadavg()
        summary = medians(results["runs"], list(targets))
        results["median"] = summary
        out = args.json or run_file("proxy_cpu")
        print(f"results: {write_json(out, results)}")
    finally:
        for p in reversed(procs):
            stop(p)


if __name__ == "__main__":
    main()

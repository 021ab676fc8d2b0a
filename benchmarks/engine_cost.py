"""What confidence costs the engine: a real vLLM CPU engine, direct and through calibserve.

One `calibserve serve --config` process runs the managed vLLM engine of the merged demo model
(the engine's port is fixed in the config, so the benchmark can also reach it directly) and
serves two models on it: `demo` with the model's own calibration.json (multiple choice by the
`answer` method: calibserve asks for 5 alternatives per token) and `demo-mean`, the same engine
with token statistics only (`mean`: calibserve asks for the sampled tokens' logprobs, no
alternatives). Closed-loop load at each concurrency, the variants interleaved:

- `direct`: the engine, no logprobs (what confidence is measured against);
- `direct-top0`: the engine, `logprobs: true, top_logprobs: 0` (what token statistics need);
- `direct-top5`: the engine, `top_logprobs: 5` (what the `answer` method needs);
- `calibserve`: through calibserve, `demo` (its logprob request is direct-top5's);
- `calibserve-mean`: through calibserve, `demo-mean` (its logprob request is direct-top0's);
- `calibserve-pinned`: `demo` through a second calibserve process (`--upstream` to the same
  engine, same calibration) pinned with `taskset` to the last core, the one vLLM's CPU backend
  reserves for its scheduler (it binds the worker's OpenMP threads to the others): the proxy
  then never preempts the worker.

Every request is a chat completion of exactly `--tokens` tokens (`min_tokens` = `max_tokens`,
temperature 0). Reported: requests/s, p50 latency, CPU seconds per request of calibserve and of
the engine's processes, split by role (vLLM's API server, which renders, tokenises and writes
the JSON answer with its logprobs; its engine core, the scheduler; its worker, the model), and
which cores each process may run on. Every ratio is also printed round by round (the variants
of a round run seconds apart; a drifting machine moves the ratio of the medians more).
`--nice-ab` runs each round twice, the engine as started and then with every engine thread 10
steps nicer than calibserve: an A/B of CPU priority on one engine (setting it back each
round needs root).

    .venv/bin/python -u benchmarks/engine_cost.py --rounds 3 \\
        --json benchmarks/.work/engine_cost.json       # the managed engine's CPU default
    .venv/bin/python -u benchmarks/engine_cost.py --rounds 3 \\
        --engine-env VLLM_ENABLE_V1_MULTIPROCESSING=1 \\
        --json benchmarks/.work/engine_cost_vllm_default.json   # vLLM's own placement
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
    descendants,
    machine,
    run_file,
    start,
    stop,
    utc_now,
    wait_http,
    write_json,
)
from benchmarks.rawhttp import Conn, build_request  # noqa: E402

PROMPT = "question : which colour is the sky ? A red B blue C green D black"
VARIANTS = ("direct", "direct-top0", "direct-top5", "calibserve", "calibserve-mean",
            "calibserve-pinned")


def merged_model() -> Path:
    """The merged demo model (built once and cached under CALIBSERVE_HOME)."""
    from calibserve.demo import build_world
    from calibserve.demo_pipeline import merge_demo

    merged = Path(merge_demo(build_world()))
    return merged / "model" if (merged / "model").is_dir() else merged


def mean_document(out: Path) -> Path:
    out.write_text(json.dumps({"version": 2, "methods": {"mean": {}},
                               "multiple_choice": "mean", "free_form": "mean"}))
    return out


def body(variant: str, tokens: int) -> dict[str, Any]:
    model = {"calibserve": "demo", "calibserve-mean": "demo-mean"}.get(variant, "demo")
    out: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                           "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}
    if variant == "direct-top0":
        out |= {"logprobs": True, "top_logprobs": 0}
    elif variant == "direct-top5":
        out |= {"logprobs": True, "top_logprobs": 5}
    return out


def role(pid: int) -> str:
    """Which part of vLLM a process of the engine's tree is (by the name vLLM gives it). With
    `VLLM_ENABLE_V1_MULTIPROCESSING=0` there is no worker process: the model runs in the
    engine core's, and its CPU is counted there."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"
    if comm.startswith("VLLM::Worker"):
        return "worker"
    if comm.startswith("VLLM::EngineCor"):
        return "engine_core"
    return "api_server"  # the API server itself (and its small resource tracker)


ROLES = ("api_server", "engine_core", "worker")


def role_cpu(pids: list[int]) -> dict[str, float]:
    out = dict.fromkeys(ROLES, 0.0)
    for p in pids:
        r = role(p)
        if r in out:
            out[r] += cpu_seconds(p)
    return out


def placement(pid: int) -> dict[str, Any]:
    """Each process's command (short) and the cores its threads may run on."""
    out: dict[str, Any] = {}
    for p in [pid, *descendants(pid)]:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
            cores: dict[str, int] = {}
            for task in Path(f"/proc/{p}/task").iterdir():
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("Cpus_allowed_list"):
                        key = line.split(":", 1)[1].strip()
                        cores[key] = cores.get(key, 0) + 1
            out[str(p)] = {"cmd": cmd, "threads_by_cores": cores}
        except OSError:
            continue
    return out


async def closed_loop(port: int, raw: bytes, concurrency: int, seconds: float
                      ) -> tuple[list[float], float]:
    """`concurrency` connections sending back to back for `seconds`: latencies and wall time."""
    conns = [await Conn.open("127.0.0.1", port) for _ in range(concurrency)]
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker(conn: Conn) -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            status, answer = await conn.request(raw)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {answer[:300]!r}")
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    wall = time.perf_counter() - t0
    for conn in conns:
        conn.close()
    return latencies, wall


NICER = 10  # --nice-ab's B: the engine this much nicer than calibserve


def engine_niceness(pids: list[int]) -> int:
    """The niceness the engine's processes run at (the highest, should they differ)."""
    return max((os.getpriority(os.PRIO_PROCESS, p) for p in pids), default=0)


def set_nice(pids: list[int], nice: int) -> None:
    """Every thread of `pids` at niceness `nice` (a process's niceness is per thread on Linux)."""
    for p in pids:
        for task in Path(f"/proc/{p}/task").iterdir():
            try:
                os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
            except ProcessLookupError:
                continue


def nice_tag(nice: int) -> str:
    return f"nice {nice}"


def round_ratios(runs: list[dict[str, Any]], conc: int, a: str, b: str) -> list[float]:
    """requests/s of variant `a` over variant `b`, round by round, at `conc` in flight."""
    rps = {(r["variant"], r["round"]): r["rps"] for r in runs if r["concurrency"] == conc}
    rounds = sorted({rnd for _, rnd in rps})
    return [rps[a, rnd] / rps[b, rnd] for rnd in rounds if (a, rnd) in rps and (b, rnd) in rps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the merged demo model")
    ap.add_argument("--ports", default="18360,18361,18362", help="calibserve,engine,pinned")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repeats (medians)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="a subset, in this order")
    ap.add_argument("--engine-args", default="", help="more vLLM arguments (engine.extra_args), "
                    "e.g. '--distributed-executor-backend uni'")
    ap.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of the managed engine (repeatable)")
    ap.add_argument("--nice-ab", action="store_true",
                    help="each round twice: the engine as started, then every engine thread "
                    "at niceness 10 (the proxy first on shared cores): an A/B on one engine")
    ap.add_argument("--json", type=Path, default=None,
                    help="every round's rows (default: a new file in "
                    "$CALIBSERVE_HOME/benchmarks/engine_cost/)")
    args = ap.parse_args()
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if args.nice_ab and os.geteuid() != 0:
        ap.error("--nice-ab: setting the engine's niceness back each round needs root")
    bad_env = [e for e in args.engine_env if "=" not in e]
    if bad_env:
        ap.error(f"--engine-env: {bad_env[0]!r} is not KEY=VALUE")
    engine_env = dict(e.split("=", 1) for e in args.engine_env)
    cs_port, engine_port, pinned_port = (int(p) for p in args.ports.split(","))
    model = args.model or merged_model()
    work = Path(tempfile.mkdtemp(prefix="engine-cost-"))
    config = work / "serve.yaml"
    config.write_text(json.dumps({
        "host": "127.0.0.1", "port": cs_port, "signing_key": "bench",
        "models": [
            {"name": "demo", "model": str(model),
             "engine": {"port": engine_port, "max_model_len": 256,
                        "extra_args": args.engine_args.split()}},
            {"name": "demo-mean", "upstreams": [f"http://127.0.0.1:{engine_port}"],
             "upstream_model": "demo", "calibration": str(mean_document(work / "mean.json"))},
        ],
    }))
    print(f"machine: {machine()}; log: {work / 'calibserve.log'}", flush=True)
    proc = start([sys.executable, "-m", "calibserve.server", "serve", "--config", str(config),
                  "--log-level", "warning"], work / "calibserve.log",
                 env={**os.environ, "PYTHONPATH": str(REPO), **engine_env})
    results: dict[str, Any] = {"machine": machine(), "date": utc_now(),
                               "model": str(model), "tokens": args.tokens,
                               "engine_args": args.engine_args, "engine_env": engine_env,
                               "runs": []}
    pinned = None
    try:
        wait_http(cs_port, "/ready", 600, proc)
        results["placement"] = placement(proc.pid)
        if "calibserve-pinned" in variants:
            last_core = sorted(os.sched_getaffinity(0))[-1]
            pinned_config = work / "pinned.yaml"
            pinned_config.write_text(json.dumps({
                "host": "127.0.0.1", "port": pinned_port, "signing_key": "bench",
                "models": [{"name": "demo", "upstreams": [f"http://127.0.0.1:{engine_port}"],
                            "upstream_model": "demo",
                            "calibration": str(model / "calibration.json")}]}))
            pinned = start(["taskset", "-c", str(last_core), sys.executable, "-m",
                            "calibserve.server", "serve", "--config", str(pinned_config),
                            "--log-level", "warning"], work / "pinned.log",
                           env={**os.environ, "PYTHONPATH": str(REPO)})
            wait_http(pinned_port, "/ready", 120, pinned)
            results["placement_pinned"] = placement(pinned.pid)
        results["load_average_start"] = os.getloadavg()
        engine_pids = descendants(proc.pid)
        own_nice = engine_niceness(engine_pids)
        results["engine_nice"] = own_nice
        nices = (own_nice, NICER) if args.nice_ab else (own_nice,)
        ports = {v: (engine_port if v.startswith("direct") else cs_port) for v in variants}
        ports["calibserve-pinned"] = pinned_port
        raws = {v: build_request("127.0.0.1", ports[v], "/v1/chat/completions",
                                 body(v, args.tokens)) for v in variants}
        for v in variants:  # warm-up, and a check that every variant answers
            asyncio.run(closed_loop(ports[v], raws[v], 4, 2.0))
        for conc in (int(c) for c in args.concurrency.split(",")):
            for rnd, nice in ((r, n) for r in range(args.rounds) for n in nices):
                set_nice(engine_pids, nice)
                for v in variants:
                    front = pinned.pid if pinned and v == "calibserve-pinned" else proc.pid
                    c0 = cpu_seconds(front)
                    e0 = role_cpu(engine_pids)
                    lat, wall = asyncio.run(closed_loop(ports[v], raws[v], conc, args.seconds))
                    c1 = cpu_seconds(front)
                    e1 = role_cpu(engine_pids)
                    n = len(lat)
                    by_role = {r: 1000 * (e1[r] - e0[r]) / n for r in ROLES}
                    run = {"variant": v, "concurrency": conc, "round": rnd, "requests": n,
                           "engine_nice": nice,
                           "rps": n / wall, "p50_ms": 1000 * statistics.median(lat),
                           "calibserve_cpu_ms": 1000 * (c1 - c0) / n,
                           "engine_cpu_ms": sum(by_role.values()),
                           "engine_cpu_ms_by_role": by_role,
                           "engine_cores_busy": sum(e1[r] - e0[r] for r in ROLES) / wall}
                    results["runs"].append(run)
                    print(f"  c={conc:3d} {v:17s} {nice_tag(nice):8s}{run['rps']:6.1f} req/s  p50 "
                          f"{run['p50_ms']:6.1f} ms  cpu ms/req: calibserve "
                          f"{run['calibserve_cpu_ms']:.2f}, vLLM api "
                          f"{by_role['api_server']:.2f} core {by_role['engine_core']:.2f} "
                          f"worker {by_role['worker']:.2f} ({run['engine_cores_busy']:.2f} cores)",
                          flush=True)
        results["load_average_end"] = os.getloadavg()
    finally:
        if pinned is not None:
            stop(pinned)
        stop(proc)
    summary: dict[str, dict[str, float]] = {}
    round_summary: dict[str, dict[str, float]] = {}
    ratios = (("direct-top5", "direct"), ("direct-top0", "direct"), ("calibserve", "direct-top5"),
              ("calibserve-mean", "direct-top0"), ("calibserve-pinned", "direct-top5"))
    groups = sorted({(r["concurrency"], r["engine_nice"]) for r in results["runs"]})
    several = len({n for _, n in groups}) > 1
    for conc, nice in groups:
        runs = [r for r in results["runs"] if r["engine_nice"] == nice]
        row = {v: statistics.median(r["rps"] for r in runs
                                    if r["variant"] == v and r["concurrency"] == conc)
               for v in variants}
        key = f"{conc} {nice_tag(nice)}" if several else str(conc)
        summary[key] = row
        print(f"c={key}: " + ", ".join(f"{v} {row[v]:.1f}" for v in variants) + " | " + " ".join(
            f"{a}/{b} {row[a] / row[b]:.2f}" for a, b in ratios if a in row and b in row))
        # The same ratios within each round (the two variants minutes apart at most), whose
        # median a drifting machine moves less than it moves the ratio of the medians.
        per_round = {f"{a}/{b}": round_ratios(runs, conc, a, b)
                     for a, b in ratios if a in row and b in row}
        round_summary[key] = {k: statistics.median(v) for k, v in per_round.items()}
        print("  per round: " + " ".join(
            f"{k} {'/'.join(f'{x:.2f}' for x in v)} (median {statistics.median(v):.2f})"
            for k, v in per_round.items()))
    results["median_rps"] = summary
    results["median_round_ratio"] = round_summary
    print(f"results: {write_json(args.json or run_file('engine_cost'), results)}")


if __name__ == "__main__":
    main()

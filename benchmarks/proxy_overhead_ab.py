"""Proxy overhead, two calibserve builds side by side: a baseline commit against this checkout.

The floor of issue 14 ("the proxy's measured overhead does not regress by more than 10%") needs a
comparison, not two numbers from two days: both builds run at once, in front of the same FAKE
upstream (calibserve.testing.openai_upstream: canned chat answers with logprobs, no model), measured
with proxy_overhead.py's own load generator and definitions, in interleaved rounds so that a
change in the machine's load hits both alike:

- added latency: sequential requests (one in flight), `--rounds` rounds of `--sequential` per
  target, the order of the two builds alternating by round; the fake alone is measured in every
  round too. Added p50/p99 = a build's pooled p50/p99 minus the fake's pooled p50/p99; the paired
  per-round ratios (candidate / baseline) are reported beside the pooled ratio.
- CPU per request: each build's process CPU time (user + system, /proc) over its sequential
  requests of the round, divided by their number: far less sensitive to a busy machine than
  latency, so it says whether a latency ratio is the build or the noise.
- sustained rate: proxy_overhead.py's open-loop search (rates x1.5 until a step fails, then 3
  bisection steps; zero errors, every answer within `--deadline`), `--rate-rounds` rounds in the
  order baseline, candidate, then candidate, baseline.

The baseline is another checkout with its own venv (its calibserve installed there), made by
`benchmarks/baseline_build.sh` (`git archive` of the commit, a venv chained to this checkout's
packages)::

    base=$(benchmarks/baseline_build.sh 58e0927)   # the commit before the change
    .venv/bin/python benchmarks/proxy_overhead_ab.py --baseline-python $base/.venv/bin/python \\
        --baseline-label 58e0927 --json benchmarks/.work/proxy_overhead_ab.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks.proxy_overhead import (
        Target,
        machine,
        max_rate,
        pct,
        sequential,
        start,
        stop,
        wait_http,
    )
except ModuleNotFoundError:  # run as a script: benchmarks/ itself is sys.path[0]
    from proxy_overhead import (  # type: ignore[no-redef]
        Target,
        machine,
        max_rate,
        pct,
        sequential,
        start,
        stop,
        wait_http,
    )

REPO = Path(__file__).resolve().parent.parent


def _commit(python: str) -> str:
    """The commit a build's checkout is at ('?' for an exported tree without git)."""
    root = Path(python).absolute().parent.parent.parent  # not resolve(): venv python links out
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (subprocess.SubprocessError, OSError):
        return "?"
    return out.stdout.strip()


def _calibserve(python: str, fake_port: int, port: int, log: Path) -> subprocess.Popen[bytes]:
    return start([python, "-m", "calibserve.server", "serve", "--upstream",
                  f"http://127.0.0.1:{fake_port}", "--served-model-name", "fake-model",
                  "--host", "127.0.0.1", "--port", str(port), "--signing-key", "bench",
                  "--log-level", "warning"], log, env=dict(os.environ))


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _added(lat: list[float], fake: list[float]) -> tuple[float, float]:
    return (1000 * (pct(lat, 0.5) - pct(fake, 0.5)), 1000 * (pct(lat, 0.99) - pct(fake, 0.99)))


def main() -> None:  # noqa: C901 - one linear run: start, measure, report
    ap = argparse.ArgumentParser(description="calibserve proxy overhead: baseline vs candidate")
    ap.add_argument("--baseline-python", required=True, help="python of the baseline's venv")
    ap.add_argument("--baseline-label", default=None, help="default: its git commit")
    ap.add_argument("--candidate-python", default=sys.executable)
    ap.add_argument("--candidate-label", default=None, help="default: its git commit")
    ap.add_argument("--ports", default="18330,18331,18332", help="fake,baseline,candidate")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--sequential", type=int, default=1000, help="requests per round and target")
    ap.add_argument("--rate-rounds", type=int, default=2)
    ap.add_argument("--step-seconds", type=float, default=5.0)
    ap.add_argument("--deadline", type=float, default=1.0)
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    args = ap.parse_args()
    if not Path(args.baseline_python).exists():
        ap.error(f"--baseline-python: {args.baseline_python} does not exist")
    fake_port, base_port, cand_port = (int(p) for p in args.ports.split(","))
    labels = {"baseline": args.baseline_label or _commit(args.baseline_python),
              "candidate": args.candidate_label or _commit(args.candidate_python)}
    work = Path(tempfile.mkdtemp(prefix="proxy-ab-"))
    procs: list[subprocess.Popen[bytes]] = []

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        fake_proc = start([sys.executable, "-m", "calibserve.testing.openai_upstream",
                           "--port", str(fake_port)], work / "fake.log")
        procs.append(fake_proc)
        wait_http(fake_port, "/health", 20, fake_proc)
        pids: dict[str, int] = {}
        for name, python, port in (("baseline", args.baseline_python, base_port),
                                   ("candidate", args.candidate_python, cand_port)):
            proc = _calibserve(python, fake_port, port, work / f"{name}.log")
            procs.append(proc)
            pids[name] = proc.pid
            wait_http(port, "/health", 90, proc)
        fake = Target("fake", fake_port)
        builds = {"baseline": Target("baseline", base_port),
                  "candidate": Target("candidate", cand_port)}
        results: dict[str, Any] = {
            "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "labels": labels, "loadavg_start": _loadavg(), "rounds": []}
        log(f"machine: {results['machine']}; load average {results['loadavg_start']}")
        log(f"baseline {labels['baseline']}  candidate {labels['candidate']}")
        for t in (fake, *builds.values()):  # warm up (imports, connection pools, caches)
            asyncio.run(sequential(t, 300))

        pooled: dict[str, list[float]] = {"fake": [], "baseline": [], "candidate": []}
        log(f"sequential latency: {args.rounds} rounds x {args.sequential} per target")
        for r in range(args.rounds):
            order = ["baseline", "candidate"] if r % 2 == 0 else ["candidate", "baseline"]
            lat = {"fake": asyncio.run(sequential(fake, args.sequential))}
            cpu: dict[str, float] = {}
            for name in order:
                before = _cpu_s(pids[name])
                lat[name] = asyncio.run(sequential(builds[name], args.sequential))
                cpu[name] = 1000 * (_cpu_s(pids[name]) - before) / args.sequential
            row: dict[str, Any] = {"order": order, "loadavg": _loadavg()}
            for name in ("baseline", "candidate"):
                p50, p99 = _added(lat[name], lat["fake"])
                row[name] = {"added_p50_ms": p50, "added_p99_ms": p99,
                             "cpu_ms_per_request": cpu[name]}
            row["ratio_p50"] = row["candidate"]["added_p50_ms"] / row["baseline"]["added_p50_ms"]
            row["ratio_p99"] = row["candidate"]["added_p99_ms"] / row["baseline"]["added_p99_ms"]
            row["ratio_cpu"] = cpu["candidate"] / cpu["baseline"] if cpu["baseline"] else None
            results["rounds"].append(row)
            for name, values in lat.items():
                pooled[name].extend(values)
            log(f"  round {r + 1}: added p50 base {row['baseline']['added_p50_ms']:.3f} ms, "
                f"cand {row['candidate']['added_p50_ms']:.3f} ms (x{row['ratio_p50']:.3f}); "
                f"p99 base {row['baseline']['added_p99_ms']:.3f}, cand "
                f"{row['candidate']['added_p99_ms']:.3f} (x{row['ratio_p99']:.3f}); CPU/request "
                f"base {cpu['baseline']:.3f} ms, cand {cpu['candidate']:.3f} ms")
        summary: dict[str, Any] = {}
        for name in ("baseline", "candidate"):
            p50, p99 = _added(pooled[name], pooled["fake"])
            summary[name] = {"added_p50_ms": p50, "added_p99_ms": p99,
                             "p50_ms": 1000 * pct(pooled[name], 0.5),
                             "p99_ms": 1000 * pct(pooled[name], 0.99)}
        summary["fake"] = {"p50_ms": 1000 * pct(pooled["fake"], 0.5),
                           "p99_ms": 1000 * pct(pooled["fake"], 0.99)}
        summary["ratio_added_p50"] = (summary["candidate"]["added_p50_ms"]
                                      / summary["baseline"]["added_p50_ms"])
        summary["ratio_added_p99"] = (summary["candidate"]["added_p99_ms"]
                                      / summary["baseline"]["added_p99_ms"])
        summary["median_round_ratio_p50"] = statistics.median(
            r["ratio_p50"] for r in results["rounds"])
        summary["median_round_ratio_p99"] = statistics.median(
            r["ratio_p99"] for r in results["rounds"])
        for name in ("baseline", "candidate"):
            summary[name]["cpu_ms_per_request"] = statistics.median(
                r[name]["cpu_ms_per_request"] for r in results["rounds"])
        summary["ratio_cpu"] = (summary["candidate"]["cpu_ms_per_request"]
                                / summary["baseline"]["cpu_ms_per_request"]
                                if summary["baseline"]["cpu_ms_per_request"] else None)
        log(f"pooled added p50: base {summary['baseline']['added_p50_ms']:.3f} ms, cand "
            f"{summary['candidate']['added_p50_ms']:.3f} ms: x{summary['ratio_added_p50']:.3f} "
            f"(median round x{summary['median_round_ratio_p50']:.3f})")
        log(f"CPU per request (median of rounds): base "
            f"{summary['baseline']['cpu_ms_per_request']:.3f} ms, cand "
            f"{summary['candidate']['cpu_ms_per_request']:.3f} ms: "
            f"x{summary['ratio_cpu'] or 0:.3f}")
        log(f"pooled added p99: base {summary['baseline']['added_p99_ms']:.3f} ms, cand "
            f"{summary['candidate']['added_p99_ms']:.3f} ms: x{summary['ratio_added_p99']:.3f} "
            f"(median round x{summary['median_round_ratio_p99']:.3f})")

        rates: dict[str, list[float]] = {"baseline": [], "candidate": []}
        steps: dict[str, list[Any]] = {"baseline": [], "candidate": []}
        log(f"sustained rate (open loop, {args.step_seconds:g}s steps, deadline "
            f"{args.deadline:g}s, zero errors): {args.rate_rounds} rounds")
        # One start rate for both (from the slower one's p50), so both searches take the same
        # steps until they part.
        first = max(5.0, min(200.0, 0.25 / max(pct(pooled[b], 0.5) for b in builds)))
        for r in range(args.rate_rounds):
            order = ["baseline", "candidate"] if r % 2 == 0 else ["candidate", "baseline"]
            for name in order:
                p50 = pct(pooled[name], 0.5)
                rate, found = asyncio.run(max_rate(builds[name], args.step_seconds,
                                                   args.deadline, first, 3 * p50 + 0.005, log))
                rates[name].append(rate)
                steps[name].append(found)
                log(f"  round {r + 1} {name:9s} sustained {rate:.0f} req/s "
                    f"(load {_loadavg()})")
        for name in ("baseline", "candidate"):
            summary[name]["sustained_rps"] = rates[name]
            summary[name]["sustained_rps_median"] = (statistics.median(rates[name])
                                                     if rates[name] else None)
        summary["ratio_sustained"] = (summary["candidate"]["sustained_rps_median"]
                                      / summary["baseline"]["sustained_rps_median"]
                                      if rates["baseline"] else None)
        results["summary"] = summary
        results["steps"] = steps
        results["loadavg_end"] = _loadavg()
        log(f"sustained: base {rates['baseline']} cand {rates['candidate']}: "
            f"x{summary['ratio_sustained'] or 0:.3f}; load average at the end "
            f"{results['loadavg_end']}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        for p in reversed(procs):
            stop(p)


if __name__ == "__main__":
    main()

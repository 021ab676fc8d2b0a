"""Calibration probes on a real vLLM engine: how soon live ECE exists, and what probes cost.

calibserve (this process, uvicorn in a thread) serves the merged demo model with a managed REAL
vLLM CPU engine and `probe_rate` probes a minute (the probe split merge wrote beside the model).

1. Time to live ECE: from launch (engine start included) to the first probe sample in /metrics,
   and the probe count and probe ECE (the recording rule's formula on the scraped counters) at
   120 s after launch, with no feedback at all.
2. Throughput cost: a closed-loop load (`--clients` official-openai-SDK clients in a separate
   process, so the client does not share this process's GIL with the proxy) sends requests of
   the probes' own shape (one multiple-choice question, one token, greedy) for `--seconds` per
   phase, phases alternating probes off / on in ABBA order (off on on off off on on off) on the
   same server and engine.
   Cost = 1 - (requests/s with probes) / (requests/s without), the two means side by side, and,
   counted rather than timed, the probes' share of the requests the engine served in the "on"
   phases (the same request shape, so the same share of its throughput).

    flock /work/heavy.lock python -m benchmarks.probes [--rate 60] [--seconds 30] [--clients 8]

Writes benchmarks/results/probes.json.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import stamp, write_json
from benchmarks.reliability.harness import InProcessServer, metric_sum, scrape

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "probes.json"
NAME = "calibserve-demo"


def probe_ece(url: str) -> tuple[float, float, float]:
    """(samples, accuracy, ECE) of the probe counters, as the recording rule computes ECE:
    sum_bins |confidence sum - correct| / samples. Read from the exposition text directly:
    prometheus_client's parser drops the hand-rendered counter `..._confidence_sum`."""
    per: dict[tuple[str, str], float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = re.match(r'(calibserve_calibration_\w+)\{([^}]*)\} (\S+)$', line)
        if m and 'source="probe"' in m.group(2):
            b = re.search(r'bin="(\d+)"', m.group(2))
            key = (m.group(1), b.group(1) if b else "")
            per[key] = per.get(key, 0.0) + float(m.group(3))
    bins = {b for _, b in per}
    n = sum(per.get(("calibserve_calibration_samples_total", b), 0.0) for b in bins)
    right = sum(per.get(("calibserve_calibration_correct_total", b), 0.0) for b in bins)
    err = sum(abs(per.get(("calibserve_calibration_confidence_sum", b), 0.0)
                  - per.get(("calibserve_calibration_correct_total", b), 0.0)) for b in bins)
    return n, (right / n if n else float("nan")), (err / n if n else float("nan"))


async def _load(url: str, seconds: float, clients: int, prompts: list[str]) -> int:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    done = 0
    stop = time.monotonic() + seconds

    async def worker(k: int) -> None:
        nonlocal done
        i = k
        while time.monotonic() < stop:
            await client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
                max_tokens=1, temperature=0)
            done += 1
            i += clients

    await asyncio.gather(*(worker(k) for k in range(clients)))
    return done


def load_phase(url: str, seconds: float, clients: int) -> float:
    """Requests per second of one phase, from a separate load process."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.probes", "--load", url, "--seconds", str(seconds),
         "--clients", str(clients)], cwd=REPO, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1]) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=60.0, help="probes per minute")
    parser.add_argument("--seconds", type=float, default=20.0, help="per throughput phase")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--load", help=argparse.SUPPRESS)  # the load process's entry point
    args = parser.parse_args(argv)
    from calibserve.demo import build_world
    from calibserve.demo_pipeline import merge_demo
    from calibserve.server.probes import ProbeSet

    world = build_world(seed=0)
    model_dir = merge_demo(world) / "model"
    prompts = [p.content for p in ProbeSet.load(model_dir / "probes.jsonl").probes]
    if args.load:
        print(asyncio.run(_load(args.load, args.seconds, args.clients, prompts)))
        return 0

    from rich.console import Console

    from calibserve.server.config import ServerSettings

    console = Console()
    settings = ServerSettings.model_validate({
        "signing_key": "bench", "host": "127.0.0.1", "probe_rate": args.rate,
        "log_level": "warning",
        "models": [{"name": NAME, "model": str(model_dir), "engine": {"max_model_len": 256}}]})
    launched = time.monotonic()
    with console.status("starting calibserve with a managed vLLM engine (about a minute)"):
        srv = InProcessServer(settings)
    ready = time.monotonic() - launched
    result: dict[str, Any] = {"rate_per_min": args.rate, "engine_start_s": ready}
    try:
        first = None
        with console.status("waiting for the first probe and for 120 s after launch"):
            while time.monotonic() - launched < 120.0:
                n, _, _ = probe_ece(srv.url)
                if first is None and n > 0:
                    first = time.monotonic() - launched
                time.sleep(0.25)
        n, acc, ece = probe_ece(srv.url)
        m = scrape(srv.url)
        result.update(first_probe_s=first, samples_at_120s=n, probe_ece_at_120s=ece,
                      probe_accuracy_at_120s=acc,
                      feedback_samples=metric_sum(m, "calibserve_calibration_samples_total",
                                                  source="feedback"))
        console.print(f"engine ready {ready:.1f} s after launch; first probe sample at "
                      f"{first:.1f} s; at 120 s: {n:.0f} probes, accuracy {acc:.3f}, "
                      f"ECE {ece:.3f}")
        [runner] = srv.runtime.probes
        assert srv.loop is not None
        phases: list[dict[str, Any]] = []
        # ABBA order (off on on off, twice): a slow drift of the shared machine's load cancels.
        for on in (False, True, True, False, False, True, True, False):
            if on:
                srv.loop.call_soon_threadsafe(runner.start)
            else:
                asyncio.run_coroutine_threadsafe(runner.stop(), srv.loop).result(30)
            before = metric_sum(scrape(srv.url), "calibserve_probes_total")
            with console.status(f"load, probes {'on' if on else 'off'} ({args.seconds:g} s)"):
                rps = load_phase(srv.url, args.seconds, args.clients)
            probes = metric_sum(scrape(srv.url), "calibserve_probes_total") - before
            phases.append({"probes": on, "requests_per_s": rps, "probes_sent": probes})
            console.print(f"probes {'on ' if on else 'off'}: {rps:.1f} requests/s "
                          f"({probes:.0f} probes)")
        off = [p["requests_per_s"] for p in phases if not p["probes"]]
        on_ = [p["requests_per_s"] for p in phases if p["probes"]]
        cost = 1.0 - (sum(on_) / len(on_)) / (sum(off) / len(off))
        # Spread of the estimate: the cost of each ABBA block on its own.
        blocks = [1.0 - (on_[i] + on_[i + 1]) / (off[i] + off[i + 1])
                  for i in range(0, len(off), 2)]
        # The engine's share taken by probes in the "on" phases: probes over all the requests it
        # served then. Probes have the user load's shape, so this is their throughput cost,
        # counted instead of timed (a busy machine moves the timed ratio far more than 5%).
        share = [p["probes_sent"] / (p["requests_per_s"] * args.seconds + p["probes_sent"])
                 for p in phases if p["probes"]]
        engine_share = sum(share) / len(share)
        result.update(phases=phases, throughput_cost=cost, cost_per_block=blocks,
                      probe_share_of_engine_requests=engine_share,
                      clients=args.clients, seconds_per_phase=args.seconds)
        console.print(f"throughput cost of {args.rate:g} probes/min: {100 * cost:.1f}% timed "
                      f"(blocks: {', '.join(f'{100 * b:.1f}%' for b in blocks)}); probes were "
                      f"{100 * engine_share:.2f}% of the engine's requests")
        requests = metric_sum(scrape(srv.url), "calibserve_requests_total")
        result["user_requests_counted"] = requests
    finally:
        srv.stop()
    result.update(stamp())
    write_json(RESULTS, result)
    console.print(f"wrote {RESULTS}")
    ok = (first is not None and first <= 120.0 and cost <= 0.05)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

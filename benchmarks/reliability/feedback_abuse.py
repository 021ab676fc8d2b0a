"""Feedback abuse: forged, replayed, truncated, wrong-key, other-model and expired ids, and floods.

Each attack must be rejected with the documented status, counted in
`calibserve_feedback_total{outcome}`, and never move the calibration counters
(`calibserve_calibration_*`, `calibserve_ece`); only the honest feedback sent alongside may move
them, by exactly what it adds. A flood of rejected feedback must not slow the server down for
others (a /health probe runs during the flood).

    python -m benchmarks.reliability.feedback_abuse [--flood 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from benchmarks.reliability.harness import (
    FAKE_MODEL,
    SIGNING_KEY,
    Percentiles,
    calibration_counters,
    calibserve_over_fake,
    chat_body,
    error_shape_ok,
    metric_sum,
    scrape,
    write_result,
)

FEEDBACK_OUTCOMES = ("accepted", "duplicate", "forged", "malformed", "unknown")


@dataclass
class Attack:
    name: str
    expected: tuple[int, ...]
    status: int
    shaped: bool  # OpenAI-shaped error body

    @property
    def ok(self) -> bool:
        return self.status in self.expected and (self.status == 200 or self.shaped)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _issue_ids(client: httpx.Client, count: int, n: int = 1, endpoint: str = "chat") -> list[str]:
    ids = []
    for _ in range(count):
        if endpoint == "chat":
            r = client.post("/v1/chat/completions", json=chat_body(n=n))
        else:
            r = client.post("/v1/completions", json={"model": FAKE_MODEL, "prompt": "hi",
                                                     "max_tokens": 4, "n": n})
        r.raise_for_status()
        ids.append(r.json()["id"])
    return ids


def attacks(real: list[str], signing_key: str) -> list[tuple[str, Any, tuple[int, ...]]]:
    """(name, JSON body, accepted statuses) for every forged/malformed/foreign case."""
    from calibserve.server.ids import ResponseIdSigner

    rid = real[0]
    prefix = "chatcmpl-"
    payload, _, tag = rid[len(prefix):].partition(".")
    other_key = ResponseIdSigner("not-the-deployment-key")
    ours = ResponseIdSigner(signing_key)
    flipped = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
    out: list[tuple[str, Any, tuple[int, ...]]] = [
        ("random tag", {"id": f"{prefix}{payload}.{_b64(b'x' * 16)}", "correct": True}, (404,)),
        ("payload edited, tag kept", {"id": f"{prefix}{flipped}.{tag}", "correct": True},
         (400, 404)),
        ("wrong key", {"id": other_key.issue(prefix, FAKE_MODEL, [0.9], [0.9]),
                       "correct": True}, (404,)),
        ("wrong key, completions prefix",
         {"id": other_key.issue("cmpl-", FAKE_MODEL, [0.1], [0.1]), "correct": False}, (404,)),
        ("prefix swapped", {"id": "cmpl-" + rid[len(prefix):], "correct": True}, (404,)),
        ("truncated by 1", {"id": rid[:-1], "correct": True}, (400, 404)),
        ("truncated by 6", {"id": rid[:-6], "correct": True}, (400, 404)),
        ("truncated to the payload", {"id": f"{prefix}{payload}", "correct": True}, (400,)),
        ("truncated to half", {"id": rid[: len(rid) // 2], "correct": True}, (400, 404)),
        ("no prefix", {"id": rid[len(prefix):], "correct": True}, (400,)),
        ("garbage", {"id": "chatcmpl-%%%.%%%", "correct": True}, (400,)),
        ("upstream-style id", {"id": "chatcmpl-fake0000", "correct": True}, (400,)),
        ("non-ascii", {"id": "chatcmpl-é.é", "correct": True}, (400,)),
        ("another model (same key)",
         {"id": ours.issue(prefix, "other-model", [0.7], [0.7]), "correct": True}, (404,)),
        ("expired (same key)",
         {"id": ours.issue(prefix, FAKE_MODEL, [0.7], [0.7], now=time.time() - 400 * 86400),
          "correct": True}, (404,)),
        ("choice out of range", {"id": rid, "correct": True, "choice": 5}, (400,)),
        ("correct and score both", {"id": rid, "correct": True, "score": 1}, (400,)),
        ("neither correct nor score", {"id": rid}, (400,)),
    ]
    return out


# Bodies FastAPI's validation rejects before the feedback code runs: still feedback abuse, so
# they must be counted as `malformed` too (see the regression test in tests/reliability).
VALIDATION_ATTACKS: list[tuple[str, Any, tuple[int, ...]]] = [
    ("id not a string", {"id": 12345, "correct": True}, (400,)),
    ("correct not a bool", {"id": "chatcmpl-x.y", "correct": "yes"}, (400,)),
    ("id too long", {"id": "chatcmpl-" + "A" * 5000 + ".x", "correct": True}, (400, 413)),
    ("extra field", {"id": "chatcmpl-x.y", "correct": True, "model": "other"}, (400,)),
    ("body is a list", [{"id": "chatcmpl-x.y", "correct": True}], (400,)),
]


def _post(client: httpx.Client, body: Any) -> httpx.Response:
    return client.post("/v1/feedback", json=body)


async def _flood(url: str, bodies: list[Any], concurrency: int) -> tuple[dict[int, int], float]:
    """Send every body with `concurrency` workers; returns (statuses, seconds)."""
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            r = await client.post("/v1/feedback", json=body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses, time.perf_counter() - started


def _probe_during(url: str, stop_after: float) -> list[float]:
    """/health latencies sampled every 50 ms for `stop_after` seconds (runs in a thread)."""
    out: list[float] = []
    deadline = time.monotonic() + stop_after
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            r = client.get("/health")
            if r.status_code == 200:
                out.append(time.perf_counter() - t0)
            time.sleep(0.05)
    return out


def run_abuse(url: str, flood: int = 2000, concurrency: int = 32,
              signing_key: str = SIGNING_KEY) -> dict[str, Any]:
    """Run every attack against calibserve at `url`; returns figures and a list of verdicts."""
    import threading

    results: list[Attack] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        real = _issue_ids(client, 6)
        real_n2 = _issue_ids(client, 1, n=2)
        real_cmpl = _issue_ids(client, 1, endpoint="completions")
        before = scrape(url)

        def attempt(name: str, body: Any, expected: tuple[int, ...]) -> None:
            r = _post(client, body)
            results.append(Attack(name, expected, r.status_code,
                                  r.status_code == 200 or error_shape_ok(r)))

        for name, body, expected in attacks(real, signing_key):
            attempt(name, body, expected)
        after_attacks = scrape(url)
        for name, body, expected in VALIDATION_ATTACKS:
            attempt(name, body, expected)
        after_validation = scrape(url)

        # Honest feedback, then replays of it: exactly the honest ones count.
        attempt("honest (chat)", {"id": real[1], "correct": True}, (200,))
        attempt("honest (completions)", {"id": real_cmpl[0], "score": 0}, (200,))
        attempt("honest n=2 choice 1", {"id": real_n2[0], "correct": False, "choice": 1}, (200,))
        attempt("replay", {"id": real[1], "correct": True}, (409,))
        attempt("replay, flipped verdict", {"id": real[1], "correct": False}, (409,))
        attempt("replay as score", {"id": real[1], "score": 1}, (409,))
        attempt("replay n=2 choice 1", {"id": real_n2[0], "correct": True, "choice": 1}, (409,))
        attempt("n=2 choice 2 (out of range)", {"id": real_n2[0], "correct": True, "choice": 2},
                (400,))
        after_honest = scrape(url)

    # Flood: forged and replayed ids mixed, while /health is probed.
    forged = [body for _, body, _ in attacks(real, signing_key)]
    bodies = [forged[i % len(forged)] if i % 4 else {"id": real[1], "correct": True}
              for i in range(flood)]
    probe: list[float] = []
    holder: dict[str, list[float]] = {}
    prober = threading.Thread(target=lambda: holder.setdefault("p", _probe_during(url, 3.0)))
    prober.start()
    statuses, seconds = asyncio.run(_flood(url, bodies, concurrency))
    prober.join()
    probe = holder.get("p", [])
    after_flood = scrape(url)

    def feedback_counts(m: Any) -> dict[str, float]:
        return {o: metric_sum(m, "calibserve_feedback_total", outcome=o) for o in FEEDBACK_OUTCOMES}

    samples = "calibserve_calibration_samples_total"
    checks = {
        "attacks rejected with the documented status": all(a.ok for a in results),
        "attacks never moved calibration counters":
            calibration_counters(before) == calibration_counters(after_attacks)
            == calibration_counters(after_validation),
        "honest feedback moved samples by exactly 3":
            metric_sum(after_honest, samples) - metric_sum(before, samples) == 3,
        "flood never moved calibration counters":
            calibration_counters(after_honest) == calibration_counters(after_flood),
        "flood all rejected": set(statuses) <= {400, 404, 409} and sum(statuses.values()) == flood,
        "flood counted": sum(feedback_counts(after_flood).values())
            - sum(feedback_counts(after_honest).values()) == flood,
        "every semantic rejection counted": sum(feedback_counts(after_attacks).values())
            - sum(feedback_counts(before).values()) == len(attacks(real, signing_key)),
        "validation rejections counted as malformed":
            feedback_counts(after_validation)["malformed"]
            - feedback_counts(after_attacks)["malformed"] == len(VALIDATION_ATTACKS),
        "server answered /health during the flood": len(probe) > 0,
    }
    return {
        "attacks": [asdict(a) | {"ok": a.ok} for a in results],
        "flood": {"requests": flood, "concurrency": concurrency, "seconds": round(seconds, 2),
                  "rate_per_s": round(flood / seconds, 1), "statuses": statuses},
        "health_during_flood": asdict(Percentiles.of(probe)),
        "feedback_total_delta": {o: feedback_counts(after_flood)[o] - feedback_counts(before)[o]
                                 for o in FEEDBACK_OUTCOMES},
        "checks": checks,
    }


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="flood of 1000")
    args = parser.parse_args(argv)
    console = Console()
    with console.status("feedback abuse against calibserve over the FAKE upstream"), \
            calibserve_over_fake(in_process=False) as (srv, _fake):
        out = run_abuse(srv.url, flood=1000 if args.quick else args.flood)
    table = Table(title="feedback abuse")
    for col in ("attack", "expected", "got", "ok"):
        table.add_column(col)
    for a in out["attacks"]:
        table.add_row(a["name"], str(a["expected"]), str(a["status"]), "yes" if a["ok"] else "NO")
    console.print(table)
    console.print(out["flood"], out["health_during_flood"], out["feedback_total_delta"])
    for name, ok in out["checks"].items():
        console.print(f"{'[green]ok[/]' if ok else '[red]FAIL[/]'} {name}")
    write_result("feedback_abuse", out)
    return 0 if all(out["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

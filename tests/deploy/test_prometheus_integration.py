"""A real Prometheus scrapes two calibserve replicas in front of a real vLLM server; the fleet
ECE it computes with deploy/prometheus/rules.yml equals calibration.ece over all the feedback.

Both replicas share one signing key, as a deployment's replicas do. They get the same prompts
but opposite feedback (replica A is told most answers were right, replica B that most were
wrong), and a third of the feedback goes to the replica that did not serve the answer; when
confidences fall between the two replicas' accuracies, per-replica |confidence - correct| does
not cancel the way the fleet's does, so averaging replicas instead of adding bins would show.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
import yaml

from calibserve.calibration import N_BINS, ece
from calibserve.server.ports import free_port
from calibserve.testing.fixtures import require
from tests.deploy.tools import RULES, tool

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

KEY = "integration-test-signing-key"
MODEL = "aligned"
SCRAPE_S = 1
QUESTIONS = [
    "question : what is the capital of the moon ? A red B blue C green D cheese",
    "question : which number is largest ? A one B two C three D four",
    "question : what colour is the sky ? A red B blue C green D black",
    "question : how many legs has a cat ? A two B four C six D eight",
    "question : which is a fruit ? A apple B stone C chair D cloud",
    "question : which animal can fly ? A dog B fish C bird D cow",
]


class Replica:
    """One calibserve app on its own port, run by uvicorn in a thread of this process."""

    def __init__(self, upstream: str) -> None:
        from calibserve.server.app import create_app
        from calibserve.server.config import ServerSettings

        settings = ServerSettings.model_validate({
            "models": [{"name": MODEL, "upstreams": [upstream], "upstream_model": MODEL}],
            "signing_key": KEY,
        })
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Replica:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "calibserve replica did not start"
            assert self.thread.is_alive(), "calibserve replica exited"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def rules_every_second(dest: Path) -> Path:
    """rules.yml with each group evaluated every second instead of every minute; the
    expressions, which are what this test is about, are untouched."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = f"{SCRAPE_S}s"
    dest.write_text(yaml.safe_dump(rules, sort_keys=False))
    return dest


@pytest.fixture()
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], str]]:
    """Factory: start Prometheus scraping the given targets; returns its base URL."""
    binary = tool("prometheus")
    require(binary is not None, "prometheus not found (Debian package `prometheus`)")
    assert binary is not None
    procs: list[subprocess.Popen[bytes]] = []

    def start(targets: list[str]) -> str:
        rules = rules_every_second(tmp_path / "rules.yml")
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "calibserve",
                                "static_configs": [{"targets": targets}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(subprocess.Popen([
            binary, f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ], stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(f"{url}/-/ready") == 200, 60, "Prometheus did not get ready")
        return url

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def wait_for(cond: Callable[[], object], timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, why
        time.sleep(0.25)


def query(prom: str, expr: str, at: float | None = None) -> list[dict]:
    params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
    body = httpx.get(f"{prom}/api/v1/query", params=params, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(prom: str, expr: str, at: float | None = None) -> float | None:
    result = query(prom, expr, at)
    return float(result[0]["value"][1]) if result else None


def ece_rule(window: str) -> str:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("record") == f"model:calibserve_calibration_ece:{window}":
                return rule["expr"]
    raise AssertionError(window)


def test_fleet_ece_from_prometheus_equals_calibration_ece(
    demo_dir: Path, vllm_server: Callable[[Path, str], str], prometheus: Callable[[list[str]], str]
) -> None:
    from openai import OpenAI

    upstream = vllm_server(demo_dir / "aligned", MODEL)
    with Replica(upstream) as a, Replica(upstream) as b:
        prom = prometheus([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"])
        # Both replicas scraped once before any feedback: every per-bin series then starts at 0
        # in Prometheus (the replicas create them at zero on start-up).
        wait_for(lambda: scalar(prom, 'count(up{job="calibserve"} == 1)') == 2, 60,
                 "Prometheus never scraped both replicas")
        first_scraped_by = time.time()

        pairs: dict[str, list[tuple[float, bool]]] = {"a": [], "b": []}
        for replica, right_when in ((a, lambda i: i % 5 != 0), (b, lambda i: i % 5 == 0)):
            client = OpenAI(base_url=f"{replica.url}/v1", api_key="unused", max_retries=0)
            for i, question in enumerate(QUESTIONS * 2):
                resp = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": question}],
                    max_tokens=4, temperature=1.0,
                )
                served = resp.choices[0].model_extra["confidence"]["score"]
                # Feedback goes to the *other* replica for every third answer: the shared
                # key lets any replica accept it, and it counts where it is received.
                target = (b if replica is a else a) if i % 3 == 0 else replica
                fb = httpx.post(f"{target.url}/v1/feedback",
                                json={"id": resp.id, "correct": right_when(i)}, timeout=10)
                assert fb.status_code == 200, fb.text
                assert fb.json()["confidence"] == served  # the id carries what was served
                pairs["a" if target is a else "b"].append((served, right_when(i)))

        total = sum(len(p) for p in pairs.values())
        union = pairs["a"] + pairs["b"]
        expected = ece(np.array([c for c, _ in union]), np.array([y for _, y in union]),
                       n_bins=N_BINS)
        # Wait until Prometheus holds every feedback sample, then until the recording rule has
        # been evaluated on that data.
        wait_for(lambda: scalar(prom, "sum(calibserve_calibration_samples_total)") == total,
                 60, "feedback never reached Prometheus")
        seen_all = time.time()
        wait_for(lambda: any(float(r["value"][0]) > seen_all + SCRAPE_S for r in
                             query(prom, "model:calibserve_calibration_ece:1h")),
                 60, "the ECE recording rule never ran on the new data")
        # At least 20 s of history keeps the extrapolation bound below (eps) under 6%.
        time.sleep(max(0.0, first_scraped_by + 20 + SCRAPE_S - time.time()))
        at = time.time()

        # 1. Exact: the rule's own expression, evaluated by this Prometheus, with each
        # increase(X[1h]) replaced by X. The replicas are fresh processes whose counters started
        # at 0, so X *is* the increase over any window covering their lifetime; increase()
        # itself would add Prometheus' extrapolation, which scales each replica's series by its
        # own factor (1 + time since its last scrape / time since its first) and so cannot be
        # compared at 1e-9. Everything else (per-(model, bin) sums across replicas, the one-to-one
        # match on bin, abs, the sums over bins, the > 0 guard) is what runs in production.
        raw = re.sub(r"increase\((\w+(?:\{[^}]*\})?)\[1h\]\)", r"\1", ece_rule("1h"))
        assert "increase" not in raw
        got = query(prom, raw, at)
        # The demo tier serves `mean`-scored replies here: ECE is kept per (model, method).
        assert [r["metric"] for r in got] == [{"model": MODEL, "method": "mean"}]
        assert float(got[0]["value"][1]) == pytest.approx(expected, abs=1e-9)

        # 2. The recorded series itself, increase() and all. Every series' first sample is 0
        # (scraped before any feedback), so increase() only extrapolates past the last scrape:
        # each replica's counters are scaled by a factor in [1, 1 + eps], eps = 1.1 scrape
        # intervals / seconds of history. With N samples and per-bin |conf - correct| summing
        # to at most N, that keeps the recorded ECE within [(E - eps) / (1 + eps), E + eps].
        # (The recorded sample read at `at` was evaluated up to one interval earlier.)
        eps = 1.1 * SCRAPE_S / (at - SCRAPE_S - first_scraped_by)
        recorded = scalar(prom, "model:calibserve_calibration_ece:1h", at)
        assert recorded is not None
        # Shown with -s, and in the report of a failure below.
        print(f"fleet ECE: calibration.ece={expected!r} prometheus(raw)={got[0]['value'][1]} "
              f"recorded={recorded!r} eps={eps:.4f} n={total} bins="
              f"{sorted({int(min(c * 15, 14)) for c, _ in union})}")
        assert (expected - eps) / (1 + eps) - 1e-9 <= recorded <= expected + eps + 1e-9

        # Each replica's own gauge covers only the feedback it received; the fleet value above is
        # not derivable from these two numbers (bins must be added before taking |.|).
        per_replica = [
            ece(np.array([c for c, _ in p]), np.array([y for _, y in p]), n_bins=N_BINS)
            for p in pairs.values()
        ]
        for name, replica_port in (("a", a.port), ("b", b.port)):
            gauge = scalar(prom, f'calibserve_ece{{instance="127.0.0.1:{replica_port}"}}', at)
            assert gauge == pytest.approx(per_replica["ab".index(name)], abs=1e-9)

"""proxy_overhead.py's machinery on a fraction of a second of load: calibserve (and nginx, where
it is installed) in front of the FAKE upstream, the concurrency sweep, streams paced by the fake,
the JSON it writes. No figure here is a benchmark result; only the shape and the orderings that
hold on any machine are asserted."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from benchmarks import proxy_overhead

pytestmark = pytest.mark.timeout(120)


def test_a_short_run_has_every_field_and_streams_arrive_token_by_token(tmp_path: Path) -> None:
    out = tmp_path / "proxy.json"
    only = "calibserve,nginx" if shutil.which("nginx") else "calibserve"
    results = proxy_overhead.main([
        "--only", only, "--warmup", "20", "--sequential", "40", "--step-seconds", "0.3",
        "--concurrency", "1,4", "--stream-interval-ms", "3", "--skip-sustained",
        "--ports", "18390,18391,18392,18393,18394", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    names = ["fake", *only.split(",")]
    assert list(results["sweep"]) == names
    for name in names:
        row = results["targets"][name]
        assert row["closed_loop_rps"] > 0 and row["cpu_ms_per_request"] > 0
        for mode in ("non_stream", "stream"):
            assert list(results["sweep"][name][mode]) == ["1", "4"]
            for c, step in results["sweep"][name][mode].items():
                assert step["concurrency"] == int(c) and step["stream"] == (mode == "stream")
                assert step["errors"] == 0 and not step["cut_off"] and step["requests"] > 0
                assert step["rps"] > 0 and 0 < step["p50_ms"] <= step["p99_ms"]
                # CPU time is counted in 10 ms clock ticks: a light target's short step (nginx,
                # a dozen streams in 0.3 s) can read 0; calibserve's non-streaming steps cannot.
                assert step["cpu_ms_per_request"] >= 0
                if name == "calibserve" and mode == "non_stream":
                    assert step["cpu_ms_per_request"] > 0
                assert "added_p50_ms" in step
        for step in results["sweep"][name]["stream"].values():
            # 8 tokens, 3 ms apart: the first arrives long before the last.
            assert step["ttft_p50_ms"] + 10 < step["p50_ms"]
            assert step["ttft_p50_ms"] <= step["ttft_p99_ms"]
            assert step["per_chunk_ms"] >= 2.0
            assert "added_ttft_p50_ms" in step and "added_per_chunk_ms" in step
    assert results["sweep"]["fake"]["stream"]["1"]["added_ttft_p50_ms"] == 0
    lines = proxy_overhead.summary_table(results)
    assert any(line.startswith("calibserve non_stream    4") for line in lines)


def test_a_baseline_build_runs_beside_calibserve_in_every_phase(tmp_path: Path) -> None:
    # This interpreter stands in for another build's venv (benchmarks/baseline_build.sh).
    results = proxy_overhead.main([
        "--only", "calibserve", "--baseline-python", sys.executable, "--warmup", "20",
        "--sequential", "40", "--step-seconds", "0.3", "--skip-sweep", "--skip-sustained",
        "--ports", "18395,18396,18397,18398,18399,18400"])
    assert list(results["targets"]) == ["fake", "calibserve", "baseline"]
    assert results["targets"]["baseline"]["cpu_ms_per_request"] > 0
    assert "added_p50" in results["calibserve_vs_baseline"]
    assert any(line.split()[:1] == ["baseline"] for line in proxy_overhead.summary_table(results))


def test_the_summary_puts_ratios_against_calibserve_first() -> None:
    def step(rps: float, cpu: float) -> dict[str, object]:
        return {"rps": rps, "cpu_ms_per_request": cpu, "p50_ms": 1.0, "p99_ms": 2.0,
                "errors": 0, "stream": False}

    results = {
        "targets": {"calibserve": {"added_p50_ms": 1.0, "cpu_ms_per_request": 0.5},
                    "litellm": {"added_p50_ms": 10.0, "cpu_ms_per_request": 5.0}},
        "sweep": {"calibserve": {"non_stream": {"8": step(1000, 0.5)}},
                  "litellm": {"non_stream": {"8": step(100, 5.0)}}},
    }
    lines = proxy_overhead.summary_table(results)
    assert lines[0].startswith("calibserve vs each peer")
    assert lines[1].split() == ["litellm", "added", "p50", "10.00x,", "CPU/req", "10.00x,", "8:",
                                "10.00x", "rps", "10.00x", "cpu"]

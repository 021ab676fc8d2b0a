"""benchmarks/common.py: the machine line, /proc CPU time, run directories, result files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from benchmarks import common


def test_machine_line_and_stamp() -> None:
    line = common.machine()
    assert f"{os.cpu_count()} cores" in line and "Python 3." in line
    assert common.cpu_model() in line
    now = common.stamp()
    assert set(now) == {"machine", "date", "load_average"}
    assert now["date"].endswith(" UTC") and len(now["load_average"]) == 3


def test_percentile_is_nearest_rank_below() -> None:
    values = [float(i) for i in range(100, 0, -1)]
    assert common.pct(values, 0.5) == 51.0 and common.pct(values, 0.99) == 100.0
    assert common.pct([3.0], 0.99) == 3.0


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="Linux /proc")
def test_cpu_time_and_memory_of_processes() -> None:
    sum(i * i for i in range(200_000))  # some CPU of our own
    assert common.cpu_seconds(os.getpid()) > 0
    assert common.tree_cpu(os.getpid()) >= common.cpu_seconds(os.getpid())
    assert common.rss_kib() > 0 and common.rss_kib(os.getpid()) > 0
    assert common.cpu_seconds(2**22 + 7) == 0.0 and common.rss_kib(2**22 + 7) == 0


def test_run_dir_and_results_go_under_calibserve_home(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALIBSERVE_HOME", str(tmp_path / "home"))
    run = common.run_dir("proxy_cpu")
    assert run == tmp_path / "home" / "benchmarks" / "proxy_cpu" and run.is_dir()
    out = common.write_json(common.run_file("proxy_cpu"), {"x": 1})
    assert out.parent == run and out.suffix == ".json"
    assert json.loads(out.read_text()) == {"x": 1}


def test_a_started_process_is_waited_for_and_stopped(tmp_path: Path) -> None:
    port = common.free_port()
    proc = common.start([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                        tmp_path / "server.log")
    try:
        common.wait_http(port, "/", 30, proc)
        common.wait_tcp(port, 5, proc)
    finally:
        common.stop(proc)
    assert proc.returncode is not None

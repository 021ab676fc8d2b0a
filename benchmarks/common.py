"""What the benchmark scripts share: where results go, the machine line, CPU time from /proc, and
the processes a run starts (the FAKE upstream, calibserve, a vLLM engine) and stops.

Processes, servers and checks that tests use too are `calibserve.testing`'s (the reliability
harness re-exports them); this module holds only what benchmarks alone need. Standard library
only at import time, so any script can import it before its heavy dependencies.

A script run as a file (`python benchmarks/x.py`) has benchmarks/ on sys.path, not the
repository; such scripts put `REPO` there before importing `benchmarks.common`.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from calibserve.server.ports import free_port  # one picker for the whole project

__all__ = [
    "REPO", "calibserve_home", "cpu_model", "cpu_seconds", "descendants", "free_port", "loadavg",
    "machine", "mem_gib", "pct", "rss_kib", "run_dir", "run_file", "stamp", "start",
    "start_calibserve", "start_fake", "stop", "tree_cpu", "utc_now", "vllm_server", "wait_http",
    "wait_tcp", "write_json",
]

REPO = Path(__file__).resolve().parents[1]


# -- where results go ---------------------------------------------------------------------------

def calibserve_home() -> Path:
    """`$CALIBSERVE_HOME`, default the checkout's `.calibserve/` (git-ignored)."""
    return Path(os.environ.get("CALIBSERVE_HOME", REPO / ".calibserve"))


def run_dir(name: str) -> Path:
    """`$CALIBSERVE_HOME/benchmarks/NAME/`, created: where a benchmark keeps what is only an
    intermediate (per-request records, per-round rows), never committed."""
    path = calibserve_home() / "benchmarks" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_file(name: str, suffix: str = ".json") -> Path:
    """A new file in `run_dir(name)` named by the UTC time: `20261207T131500Z.json`."""
    return run_dir(name) / time.strftime(f"%Y%m%dT%H%M%SZ{suffix}", time.gmtime())


def write_json(path: Path, data: Any, indent: int | None = 2) -> Path:
    """`data` as JSON at `path` (folders made), newline-terminated; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, default=str) + "\n")
    return path


# -- the machine --------------------------------------------------------------------------------

def utc_now() -> str:
    """The date line every result carries: `YYYY-MM-DD HH:MM UTC`."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def mem_gib() -> float | None:
    """Total memory in GiB (/proc/meminfo), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> str:
    """`CPU model, N cores, Python X.Y.Z, Linux`: the machine line of a result."""
    return (f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.system()}")


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to 0.01."""
    return [round(x, 2) for x in os.getloadavg()]


def stamp() -> dict[str, Any]:
    """`machine`, `date` and `load_average` now: what a result starts with."""
    return {"machine": machine(), "date": utc_now(), "load_average": loadavg()}


def pct(values: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, nearest rank below (the benchmarks' definition)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- CPU time and memory from /proc (Linux) -----------------------------------------------------

def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of one process (with `children`, also its reaped children's: cutime +
    cstime); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15 if children else 13]) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (a worker, an engine, Node's children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its live descendants."""
    return sum(cpu_seconds(p) for p in [pid, *descendants(pid)])


def rss_kib(pid: int | str = "self") -> int:
    """Resident memory of a process in KiB (VmRSS), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- processes ----------------------------------------------------------------------------------

def start(cmd: list[str], log_path: Path, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    """`cmd` in its own session (so `stop` ends its whole tree), output to `log_path`."""
    with Path(log_path).open("wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group `start` made, SIGKILL after 15 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Until `http://127.0.0.1:PORT/PATH` answers 200; raises if `proc` exits first."""
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


def wait_tcp(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Until something accepts connections on `port` (servers with no health route)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process on port {port} exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


def start_fake(port: int, log_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    """The FAKE upstream (calibserve.testing.openai_upstream: canned OpenAI answers with
    logprobs, no model) on `port`, healthy when this returns; `extra`: its flags."""
    proc = start([sys.executable, "-m", "calibserve.testing.openai_upstream",
                  "--port", str(port), *extra], log_path)
    wait_http(port, "/health", 20, proc)
    return proc


def start_calibserve(port: int, log_path: Path, serve_args: Sequence[str],
                     python: str | None = None, timeout: float = 60.0,
                     env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`PYTHON -m calibserve.server serve SERVE_ARGS` on 127.0.0.1:PORT (signing key `bench`,
    log level warning), healthy when this returns. Another build's interpreter (`python`) runs
    without this checkout's PYTHONPATH."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = start([python or sys.executable, "-m", "calibserve.server", "serve", *serve_args,
                  "--host", "127.0.0.1", "--port", str(port), "--signing-key", "bench",
                  "--log-level", "warning"], log_path, env=env)
    wait_http(port, "/health", timeout, proc)
    return proc


@contextmanager
def vllm_server(model_dir: Path, name: str, log_dir: Path) -> Iterator[str]:
    """A REAL vLLM engine serving `model_dir` as `name` (calibserve.testing.VLLMProcess, the
    command `calibserve serve` runs); yields its URL once ready, stops it after."""
    from calibserve.testing.vllm_process import VLLMProcess

    proc = VLLMProcess(model_dir, name, log_dir)
    proc.start()
    try:
        proc.wait_ready()
        yield proc.url
    finally:
        proc.stop()

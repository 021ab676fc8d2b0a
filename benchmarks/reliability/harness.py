"""Shared parts of the reliability harness: processes, servers, metrics and result checks.

Everything listens on 127.0.0.1 only. Ports are either chosen by the OS (port 0, for servers
we run in this process or that print their port) or taken from 18600-18699, the range set aside
for this harness on shared machines. Every process started here is stopped by its owner
(context managers), by pid, never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
PORT_RANGE = range(18600, 18700)
SIGNING_KEY = "reliability-signing-key"
FAKE_MODEL = "fake-model"
UPSTREAM_STATUSES = frozenset({502, 503, 504})


def machine_line() -> str:
    """Date and machine, for RESULTS.md."""
    import platform

    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:  # pragma: no cover - psutil is in the bench extra
        mem = "? GiB"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f"{stamp}; {platform.machine()}, {os.cpu_count()} cores, {mem}, Python "
            f"{platform.python_version()}; machine shared with other jobs while measured")


def port_in_range() -> int:
    """A free TCP port in 18600-18699 (trial bind; another user may still race us)."""
    start = os.getpid() % len(PORT_RANGE)  # spread concurrent harnesses over the range
    for i in range(len(PORT_RANGE)):
        port = PORT_RANGE[(start + i) % len(PORT_RANGE)]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18600-18699")


def python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


# --- the fake upstream --------------------------------------------------------------------------

class FakeUpstream:
    """tests/fakes/recording_upstream.py (a FAKE: canned answers) as a child."""

    def __init__(self, tokens: int = 8) -> None:
        self.proc = subprocess.Popen(
            [python(), "-m", "tests.fakes.recording_upstream", "--port", "0",
             "--model", FAKE_MODEL, "--tokens", str(tokens)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"http://[\d.]+:(\d+)", line)
        if not match:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"fake upstream did not start: {line!r}")
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def mode(self, mode: str, delay_ms: float = 0) -> None:
        httpx.post(f"{self.url}/fake/mode", json={"mode": mode, "delay_ms": delay_ms}, timeout=5)

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/fake/stats", timeout=5).json()

    def reset(self) -> None:
        httpx.post(f"{self.url}/fake/reset", timeout=5)
        self.mode("ok")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- calibserve ---------------------------------------------------------------------------------

def fake_settings(upstream: str, **extra: Any) -> Any:
    """ServerSettings for calibserve in front of the fake upstream."""
    from calibserve.server.config import ServerSettings

    data: dict[str, Any] = {"signing_key": SIGNING_KEY, "host": "127.0.0.1", "models": [
        {"name": FAKE_MODEL, "upstreams": [upstream], "upstream_model": FAKE_MODEL}]}
    data.update(extra)
    return ServerSettings.model_validate(data)


class InProcessServer:
    """calibserve served by uvicorn on port 0 in a thread of this process (real HTTP)."""

    def __init__(self, settings: Any, start_timeout: float = 600.0, **uvicorn_kw: Any) -> None:
        import uvicorn

        from calibserve.server.app import create_app
        from calibserve.server.connections import ConnectionGuard, ConnectionLimits

        self.app = create_app(settings)
        self.runtime = self.app.state.runtime
        # The HTTP protocol `calibserve serve` runs (server/cli.py), with its deadlines and
        # connection cap, so tests see its bytes and its limits.
        self.guard = ConnectionGuard(ConnectionLimits.from_settings(self.runtime.settings),
                                     self.runtime.metrics)
        kw: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "log_level": "warning",
                              "lifespan": "on", "timeout_graceful_shutdown": 5,
                              "http": self.guard.protocol()}
        kw.update(uvicorn_kw)
        self.server = uvicorn.Server(uvicorn.Config(self.app, **kw))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="calibserve")
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"calibserve did not start: {self.error!r}")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def _run(self) -> None:
        try:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.serve())
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            self.error = exc

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CalibserveProcess:
    """`python -m calibserve serve ...` as a child process (its own RSS, its own signals)."""

    def __init__(self, args: list[str], log_path: Path | None = None,
                 start_timeout: float = 60.0, env: dict[str, str] | None = None) -> None:
        self.port = port_in_range()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        out: Any = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self._log = out
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("CALIBSERVE_SIGNING_KEY", SIGNING_KEY)
        self.proc = subprocess.Popen(
            [python(), "-m", "calibserve", "serve", "--host", "127.0.0.1", "--port",
             str(self.port), *args],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=full_env,
        )
        self.wait_health(start_timeout)

    def wait_health(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"calibserve exited with {self.proc.returncode}: {self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"calibserve not healthy after {timeout:.0f}s: {self.tail()}")

    def tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self._log, "close"):
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> CalibserveProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def calibserve_over_fake(in_process: bool = True, **settings: Any
                         ) -> Iterator[tuple[Any, FakeUpstream]]:
    """The fake upstream and calibserve in front of it; yields (server, fake)."""
    with FakeUpstream() as fake:
        if in_process:
            with InProcessServer(fake_settings(fake.url, **settings)) as srv:
                yield srv, fake
        else:
            args = ["--upstream", fake.url, "--served-model-name", FAKE_MODEL,
                    "--log-level", "warning"]
            with CalibserveProcess(args) as proc:
                yield proc, fake


# --- checks -------------------------------------------------------------------------------------

def is_openai_error(body: Any) -> bool:
    """`{"error": {"message": str, "type": str, "param": str|null, "code": str|int|null}}`."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return False
    err = body["error"]
    return (isinstance(err, dict) and isinstance(err.get("message"), str)
            and isinstance(err.get("type"), str) and "param" in err and "code" in err
            and (err["param"] is None or isinstance(err["param"], str))
            and (err["code"] is None or isinstance(err["code"], str | int)))


def error_shape_ok(response: httpx.Response) -> bool:
    try:
        return is_openai_error(response.json())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def metric_sum(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
               **labels: str) -> float:
    """Sum of every sample called `name` whose labels include `labels`."""
    total = 0.0
    for (sample, lbls), value in metrics.items():
        if sample != name:
            continue
        d = dict(lbls)
        if all(d.get(k) == v for k, v in labels.items()):
            total += value
    return total


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)


def calibration_counters(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]
                         ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Only the per-bin calibration series (what feedback abuse must never move)."""
    return {k: v for k, v in metrics.items() if k[0].startswith("calibserve_calibration_")
            or k[0] == "calibserve_ece"}


@dataclass
class Percentiles:
    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Percentiles:
        if not seconds:
            return cls(0, float("nan"), float("nan"), float("nan"))
        xs = sorted(seconds)

        def q(p: float) -> float:
            return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000

        return cls(len(xs), q(0.50), q(0.99), xs[-1] * 1000)


def chat_body(stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 8}
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


def write_result(name: str, data: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Save a script's figures as JSON next to the scripts (results/NAME.json)."""
    out_dir = out_dir or Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_line(), **data}, indent=2, default=str) + "\n")
    return path

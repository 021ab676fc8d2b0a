"""calibserve itself for tests and benchmarks: in this process or as a child, over real HTTP.

Everything listens on 127.0.0.1 only. Ports are chosen by the OS (port 0) or taken from
18600-18699, the range set aside for harnesses on shared machines. Every process started here is
stopped by its owner (context managers), by pid, never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from calibserve.testing.fake_upstream import FAKE_MODEL, FakeUpstream

PORT_RANGE = range(18600, 18700)
SIGNING_KEY = "reliability-signing-key"


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
            [sys.executable, "-m", "calibserve", "serve", "--host", "127.0.0.1", "--port",
             str(self.port), *args],
            stdout=out, stderr=subprocess.STDOUT, env=full_env,
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
        import psutil  # type: ignore[import-untyped]

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

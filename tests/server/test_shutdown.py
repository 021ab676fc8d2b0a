"""SIGTERM: stop accepting, finish in-flight requests, then stop the managed engine and exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from calibserve.server.ports import free_port
from calibserve.testing.fake_upstream import fake_python
from tests.server.conftest import REPO, FakeUpstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "question : ?"}]}


def start_server(args: list[str], port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "calibserve.server", "serve", "--host", "127.0.0.1",
         "--port", str(port), "--signing-key", "k", "--served-model-name", "m", *args],
        cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not become ready")


def test_sigterm_drains_in_flight_requests(fake_upstream: FakeUpstream) -> None:
    port = free_port()
    proc = start_server(["--upstream", fake_upstream.url], port)
    try:
        fake_upstream.mode("slow", delay_ms=1500)
        results: list[httpx.Response] = []
        t = threading.Thread(target=lambda: results.append(httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=10)))
        t.start()
        time.sleep(0.4)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:  # no longer accepting
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            accepted = True
        except httpx.HTTPError:
            accepted = False
        t.join(10)
        assert results and results[0].status_code == 200, "the in-flight request was drained"
        assert not accepted
        assert proc.wait(15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    finally:
        fake_upstream.mode("ok")
        if proc.poll() is None:
            proc.kill()


def test_sigterm_stops_the_managed_engine(tmp_path: Path) -> None:
    port = free_port()
    settings = tmp_path / "calibserve.yaml"
    settings.write_text(
        "models:\n  - name: m\n    model: " + str(tmp_path) + "\n"
        "    engine: {python: " + fake_python(tmp_path) + "}\n"
    )
    proc = start_server(["--config", str(settings)], port)
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True,
                        text=True).stdout
    engine_pids = [int(line.split()[0]) for line in ps.splitlines()
                   if "openai_upstream.py" in line and str(proc.pid) in line.split()[1]]
    assert engine_pids, ps
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) in (0, -signal.SIGTERM)
    time.sleep(0.2)
    for pid in engine_pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"engine process {pid} outlived the server")

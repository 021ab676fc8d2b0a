"""The FAKE OpenAI upstream as a child process: canned answers, fault injection, no model.

It runs `recording_upstream` (the `openai_upstream` server plus what an upstream sees of each
request: completed, cancelled, in flight), prints its URL, and is controlled over HTTP:
`POST /fake/mode {"mode", "delay_ms"}`, `GET /fake/stats`, `POST /fake/reset`.
"""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from calibserve.testing import openai_upstream

FAKE_MODEL = "fake-model"


class FakeUpstream:
    """`recording_upstream` as a child on a port the OS picks; stop it (or use `with`)."""

    def __init__(self, tokens: int = 8, model: str = FAKE_MODEL,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "calibserve.testing.recording_upstream", "--port", "0",
             "--model", model, "--tokens", str(tokens), *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
        stats: dict[str, Any] = httpx.get(f"{self.url}/fake/stats", timeout=5).json()
        return stats

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
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fake_python(tmp_path: Path, body: str | None = None) -> str:
    """An executable that takes vLLM's command line and runs the fake upstream on its --port
    (`engine: {python: ...}`: a managed engine that starts in a moment)."""
    script = tmp_path / "fake-python"
    body = body or (
        f'exec "{sys.executable}" "{openai_upstream.__file__}" '
        '--port "$PORT" --model "$NAME"'
    )
    script.write_text(
        "#!/bin/bash\n"
        'while [ $# -gt 0 ]; do case "$1" in --port) PORT=$2; shift;; '
        "--served-model-name) NAME=$2; shift;; esac; shift; done\n"
        'echo "pretend vLLM starting on $PORT"\n' + body + "\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)

"""Start and stop real vLLM OpenAI servers for the integration tests and benchmarks.

The command line and environment are the ones `calibserve serve --model DIR` gives its managed
engine (server/engine.build_command, on this machine's CPU or GPU), so the integration tests run
the engine calibserve launches. Tests talk to vLLM only over HTTP, exactly as calibserve does in
production. Servers are started once per test session (each takes about a minute on a laptop
CPU) and shared by every test.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

from calibserve.server.config import EngineSettings
from calibserve.server.engine import build_command, cuda_available
from calibserve.server.ports import free_port

START_TIMEOUT_S = float(os.environ.get("CALIBSERVE_TEST_VLLM_TIMEOUT", "420"))


class VLLMProcess:
    """One `vllm.entrypoints.openai.api_server` child process serving one model directory."""

    def __init__(
        self,
        model_dir: Path,
        name: str,
        log_dir: Path,
        *,
        max_model_len: int = 256,
        enforce_eager: bool = False,
        extra_args: tuple[str, ...] = (),
        verify: bool = False,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.name = name
        self.max_model_len = max_model_len
        # No torch.compile: a 30-layer model then starts in about 50 s instead of 190 s here.
        self.enforce_eager = enforce_eager
        self.extra_args = tuple(extra_args)  # more vLLM arguments (benchmarks)
        self.verify = verify  # serves the `verify` method (build_command's block size)
        self.port = free_port()
        self.log_path = Path(log_dir) / f"vllm-{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        """`calibserve serve`'s engine command for this model, port and options."""
        settings = EngineSettings(
            max_model_len=self.max_model_len,
            extra_args=[*(["--enforce-eager"] if self.enforce_eager else []), *self.extra_args])
        cmd, env = build_command(self.model_dir, self.name, "127.0.0.1", self.port, settings,
                                 cuda_available(), self.verify)
        # Test logs keep vLLM's warnings only, unless the caller asked for more.
        env["VLLM_LOGGING_LEVEL"] = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
        return cmd, env

    def start(self) -> None:
        cmd, env = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM for {self.name} exited early:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(
            f"vLLM for {self.name} not healthy after {START_TIMEOUT_S}s:\n{self.tail()}"
        )

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

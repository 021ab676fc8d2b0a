"""What a newcomer's console shows: lines printed before calibserve is ready (issue 31's floors).

    python benchmarks/console_lines.py serve [--model DIR]   # default: the demo merge's model
    python benchmarks/console_lines.py demo                  # `make demo` (port 8000), as typed
    python benchmarks/console_lines.py bad-model             # serve --model on an empty dir

`serve` and `demo` count the lines (stdout and stderr together) printed until `/ready` first
answers 200, and with the ready block that follows; with `--linger S` they then send a request a
second for S seconds (the demo also probes itself, 60 a minute) and count what that printed; then
they stop the process (SIGTERM to its group); `serve` first kills its engine (SIGKILL) and times
how long the console takes to say so. `bad-model` times the one-line error and reports the exit
code. Each prints the console it saw and one JSON line of figures. Floors (RESULTS.md): serve
at most 15 lines before ready, `make demo` on a cached world at most 25; a failed engine on the
console within 5 s.

`ConsoleRun` is also what tests/server/test_serve_console.py and test_console_vllm.py run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: benchmarks/ itself is sys.path[0]
    sys.path.insert(0, str(REPO))

from benchmarks.common import free_port  # noqa: E402

READY_LINE = "calibserve is ready: "
BLOCK_END = "  metrics: "  # the ready block's last line but the demo's report line
ENGINE_MARKER = "vllm.entrypoints.openai.api_server"


class ConsoleRun:
    """One command's console, line by line with the time each line arrived (time.time())."""

    def __init__(self, command: list[str], url: str, env: dict[str, str] | None = None,
                 cwd: Path = REPO) -> None:
        self.url = url
        self.lines: list[tuple[float, str]] = []
        self.lines_before_ready: int | None = None
        full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
        full_env.pop("CALIBSERVE_SIGNING_KEY", None)  # as a newcomer runs it
        self.started = time.time()
        self.proc = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def serve(cls, args: list[str], state: Path | None = None,
              python: str = sys.executable) -> ConsoleRun:
        """`calibserve serve --host 127.0.0.1 --port P ARGS`; `state`: its $CALIBSERVE_HOME."""
        port = free_port()
        env = {"CALIBSERVE_HOME": str(state)} if state is not None else None
        return cls([python, "-m", "calibserve", "serve", "--host", "127.0.0.1",
                    "--port", str(port), *args], f"http://127.0.0.1:{port}", env)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_ready(self, timeout: float) -> float:
        """Until /ready answers 200 (seconds since start); `lines_before_ready` is what had
        been printed by then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"it exited ({self.proc.returncode}):\n{self.text}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    self.lines_before_ready = len(self.lines)
                    return time.time() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready after {timeout} s:\n{self.text}")

    def lines_before(self, text: str) -> int:
        """How many lines came before the first one containing `text` (all: none does)."""
        return next((i for i, (_, line) in enumerate(self.lines) if text in line),
                    len(self.lines))

    def wait_for(self, text: str, timeout: float = 10.0) -> tuple[float, str]:
        """The first line containing `text` (waiting for it up to `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            for when, line in list(self.lines):
                if text in line:
                    return when, line
            if time.monotonic() >= deadline:
                raise AssertionError(f"no line with {text!r} after {timeout} s:\n{self.text}")
            time.sleep(0.02)

    def finish(self, timeout: float = 60.0) -> int:
        """The exit code once it has exited by itself."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> int:
        """SIGTERM to its process group (make and what it ran), then its exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(5)
        return self.proc.wait()

    def children(self, marker: str, parent: int | None = None) -> list[int]:
        """Pids of the processes whose parent is `parent` (default: this command) and whose
        command line contains `marker`."""
        ps = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True,
                            text=True, check=True).stdout
        want = str(parent if parent is not None else self.proc.pid)
        return [int(row.split()[0]) for row in ps.splitlines()[1:]
                if marker in row and row.split()[1] == want]


def _demo_model() -> Path:
    from calibserve.demo import build_world
    from calibserve.demo_pipeline import merge_demo

    return merge_demo(build_world()) / "model"


def linger(run: ConsoleRun, model: str, seconds: float) -> dict[str, object]:
    """A chat request a second for `seconds`: the lines that printed meanwhile."""
    before = len(run.lines)
    body = {"model": model, "max_tokens": 1,
            "messages": [{"role": "user", "content": "question : ? A x B y"}]}
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=run.url, timeout=30) as client:
        while time.monotonic() < deadline:
            code = str(client.post("/v1/chat/completions", json=body).status_code)
            statuses[code] = statuses.get(code, 0) + 1
            time.sleep(1.0)
    return {"linger_s": seconds, "linger_statuses": statuses,
            "linger_lines": len(run.lines) - before}


def measure_serve(model: Path, timeout: float, kill: bool = True,
                  linger_s: float = 0.0) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as state:
        run = ConsoleRun.serve(["--model", str(model)], Path(state))
        try:
            ready_s = run.wait_ready(timeout)
            run.wait_for(BLOCK_END)
            out: dict[str, object] = {
                "what": "calibserve serve --model " + str(model), "ready_s": round(ready_s, 1),
                "lines_before_ready": run.lines_before_ready,
                "lines_before_block": run.lines_before(READY_LINE),
                "lines_with_block": len(run.lines)}
            if linger_s > 0:
                out.update(linger(run, model.parent.name if model.name == "model"
                                  else model.name, linger_s))
            if kill:
                (engine,) = run.children(ENGINE_MARKER)
                os.kill(engine, signal.SIGKILL)
                killed = time.time()
                when, _ = run.wait_for("was killed by SIGKILL", timeout=10)
                out["engine_killed_on_console_s"] = round(when - killed, 2)
        finally:
            run.stop()
            print(run.text)
    return out


def measure_demo(timeout: float, linger_s: float = 0.0) -> dict[str, object]:
    run = ConsoleRun(["make", "demo"], "http://127.0.0.1:8000")
    try:
        ready_s = run.wait_ready(timeout)
        run.wait_for("  report: ")
        out: dict[str, object] = {
            "what": "make demo", "ready_s": round(ready_s, 1),
            "lines_before_ready": run.lines_before_ready,
            "lines_before_block": run.lines_before(READY_LINE),
            "lines_with_block": len(run.lines)}
        if linger_s > 0:
            out.update(linger(run, "calibserve-demo", linger_s))
        return out
    finally:
        run.stop()
        print(run.text)


def measure_bad_model(timeout: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty"
        empty.mkdir()
        run = ConsoleRun.serve(["--model", str(empty)], Path(tmp) / "state")
        code = run.finish(timeout)
        print(run.text)
        errors = [line for _, line in run.lines if "vLLM engine" in line]
        return {"what": "calibserve serve --model EMPTY_DIR", "exit_code": code,
                "lines": len(run.lines), "seconds": round(run.lines[-1][0] - run.started, 1),
                "error_line": errors[-1] if errors else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["serve", "demo", "bad-model"])
    ap.add_argument("--model", type=Path, help="serve: the checkpoint (default: demo merge)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--linger", type=float, default=0.0,
                    help="serve, demo: seconds of one request a second after ready")
    args = ap.parse_args()
    if args.what == "serve":
        result = measure_serve(args.model or _demo_model(), args.timeout, linger_s=args.linger)
    elif args.what == "demo":
        result = measure_demo(args.timeout, args.linger)
    else:
        result = measure_bad_model(args.timeout)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

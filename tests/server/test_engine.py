"""The managed engine: command line, start errors, supervision, and the server while it is down.

Supervision is tested with a stand-in "python" that runs the fake upstream instead of vLLM (same
command line, same /health), so restarts take milliseconds; the real vLLM engine is killed and
restarted once in test_integration.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from calibserve.server.config import EngineSettings, ServerSettings
from calibserve.server.engine import EngineStartError, ManagedEngine, build_command
from calibserve.testing.checks import total
from calibserve.testing.fake_upstream import fake_python
from tests.server.conftest import serve

CHAT = {"model": "m", "messages": [{"role": "user", "content": "question : ?"}]}


def test_cpu_and_gpu_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 512}')
    cmd, env = build_command(tmp_path, "m", "127.0.0.1", 18350, EngineSettings(), cuda=False)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for part in ("--dtype float32", "--max-model-len 512", "--gpu-memory-utilization 0.3",
                 "--max-logprobs 20", "--served-model-name m", "--port 18350"):
        assert part in joined
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the worker in the engine core on CPU
    gpu, gpu_env = build_command(tmp_path, "m", "127.0.0.1", 1, EngineSettings(), cuda=True)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in gpu_env  # GPU: vLLM's own default
    assert "--dtype" not in gpu and "--gpu-memory-utilization" not in gpu
    assert "--max-logprobs" in gpu
    assert "--block-size" not in gpu  # GPU: vLLM's own (16)


def test_block_size_is_a_setting_and_extra_args_win(tmp_path: Path) -> None:
    def block_sizes(settings: EngineSettings, cuda: bool, verify: bool = False) -> list[str]:
        cmd, _ = build_command(tmp_path, "m", "127.0.0.1", 1, settings, cuda=cuda,
                               verify=verify)
        return [cmd[i + 1] for i, part in enumerate(cmd) if part == "--block-size"]

    assert block_sizes(EngineSettings(), cuda=False) == []  # vLLM's own
    assert block_sizes(EngineSettings(), cuda=False, verify=True) == ["32"]  # reuse the reply
    assert block_sizes(EngineSettings(), cuda=True, verify=True) == []  # GPU: vLLM's 16
    assert block_sizes(EngineSettings(block_size=64), cuda=False) == ["64"]
    assert block_sizes(EngineSettings(block_size=32), cuda=True) == ["32"]
    mine = EngineSettings(block_size=64, extra_args=["--block-size", "128"])
    assert block_sizes(mine, cuda=False) == ["128"]
    assert block_sizes(mine, cuda=True) == ["128"]


def test_access_log_is_off_unless_asked(tmp_path: Path) -> None:
    for cuda in (False, True):
        cmd, _ = build_command(tmp_path, "m", "127.0.0.1", 1, EngineSettings(), cuda=cuda)
        assert cmd.count("--disable-uvicorn-access-log") == 1
        on, _ = build_command(tmp_path, "m", "127.0.0.1", 1, EngineSettings(access_log=True),
                              cuda=cuda)
        assert "--disable-uvicorn-access-log" not in on


def test_cpu_worker_placement_is_a_setting(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    off = EngineSettings(cpu_worker_in_engine_core=False)
    _, env = build_command(tmp_path, "m", "127.0.0.1", 1, off, cuda=False)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the operator's own choice wins
    _, env = build_command(tmp_path, "m", "127.0.0.1", 1, EngineSettings(), cuda=False)
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def engine_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "calibserve.engine"]


def test_output_goes_to_its_log_file_and_the_console_gets_calibserves_lines(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="calibserve.engine")
    settings = EngineSettings(python=fake_python(tmp_path), log_dir=tmp_path / "logs")
    engine = ManagedEngine("m", tmp_path, settings)
    asyncio.run(_start_and_stop(engine))
    path = tmp_path / "logs" / "engine-m.log"
    assert engine.output.path == path
    text = path.read_text()
    assert "pretend vLLM starting" in text and "vllm.entrypoints.openai.api_server" in text
    lines = engine_records(caplog)
    assert not [line for line in lines if "pretend vLLM" in line]  # nothing relayed
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert info[0] == f"engine m: starting vLLM (its output: {path})"
    assert re.fullmatch(r"engine m: ready after \d+ s", info[1]), info
    assert sum(str(path) in line for line in info) == 1  # the path, once


def test_the_console_flag_relays_the_output_and_still_writes_the_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="calibserve.engine")
    settings = EngineSettings(python=fake_python(tmp_path), log_dir=tmp_path, console=True)
    engine = ManagedEngine("m", tmp_path, settings)
    asyncio.run(_start_and_stop(engine))
    assert any(line.startswith("[engine m] pretend vLLM starting")
               for line in engine_records(caplog))
    assert "pretend vLLM starting" in engine.output.path.read_text()


async def _start_and_stop(engine: ManagedEngine) -> None:
    await engine.start()
    try:
        assert engine.up
    finally:
        await engine.stop()


def test_start_failure_is_one_line_naming_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="calibserve.engine")
    settings = EngineSettings(
        python=fake_python(tmp_path, 'echo "loading weights"; '
                           'echo "ValueError: boom: no such model"; exit 3'),
        start_timeout_s=20, log_dir=tmp_path)
    engine = ManagedEngine("m", tmp_path, settings)
    with pytest.raises(EngineStartError) as info:
        asyncio.run(engine.start())
    path = tmp_path / "engine-m.log"
    assert str(info.value) == ("vLLM engine 'm' exited with code 3 while starting: ValueError: "
                               f"boom: no such model (log: {path})")
    assert not engine.up
    # The console had the log's last lines just before.
    (shown,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert shown.splitlines()[0] == "engine m exited with code 3 while starting; the last " \
                                    "lines of its log:"
    assert "    loading weights" in shown and "    ValueError: boom: no such model" in shown
    assert "exited with code 3 while starting" in path.read_text()  # and the file says so


def test_an_engine_killed_while_starting_is_reported_as_killed(tmp_path: Path) -> None:
    settings = EngineSettings(python=fake_python(tmp_path, 'echo "loading"; kill -9 $$'),
                              start_timeout_s=20, log_dir=tmp_path)
    with pytest.raises(EngineStartError, match=r"^vLLM engine 'm' was killed by SIGKILL while "
                       r"starting \(log: .*engine-m\.log\)$"):
        asyncio.run(ManagedEngine("m", tmp_path, settings).start())


def test_start_timeout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = EngineSettings(python=fake_python(tmp_path, 'echo "loading forever"; sleep 60'),
                              start_timeout_s=1.5, log_dir=tmp_path)
    engine = ManagedEngine("m", tmp_path, settings)
    with pytest.raises(EngineStartError, match=r"^vLLM engine 'm' not healthy after 2 s \(log: "):
        asyncio.run(engine.start())
    assert "    loading forever" in caplog.text


def test_restart_after_kill(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="calibserve.engine")
    asyncio.run(_restart_after_kill(tmp_path, caplog))


async def _restart_after_kill(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    restarts: list[int] = []
    settings = EngineSettings(python=fake_python(tmp_path), restart_backoff_s=0.1,
                              log_dir=tmp_path)
    engine = ManagedEngine("m", tmp_path, settings, on_restart=lambda: restarts.append(1))
    await engine.start()
    try:
        assert engine.up
        exited = engine.exited()
        assert not exited.done()
        pid = engine.pid
        assert pid is not None
        httpx.post(f"{engine.url}/fake/mode", json={"mode": "ok"})  # a line in its log
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.wait_for(exited, 5)
        assert not engine.up
        # The console has the exit, the log's path and its last lines at once (within 5 s).
        while not [r for r in caplog.records if r.levelno == logging.ERROR]:
            assert time.monotonic() - killed < 5
            await asyncio.sleep(0.01)
        (shown,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert shown.startswith(f"engine m was killed by SIGKILL; restarting in 0.1 s (log: "
                                f"{engine.output.path}); its last lines:\n    ")
        deadline = time.monotonic() + 20
        while not engine.up and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert engine.up and engine.pid != pid and restarts == [1]
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{engine.url}/health")).status_code == 200
    finally:
        await engine.stop()
    assert not engine.up


def test_server_with_managed_engine_down_and_back(tmp_path: Path) -> None:
    settings = ServerSettings.model_validate({
        "signing_key": "k",
        "models": [{"name": "m", "model": str(tmp_path), "engine": {
            "python": fake_python(tmp_path), "restart_backoff_s": 1.0}}],
    })
    with serve(settings) as running, httpx.Client(base_url=running.url, timeout=10) as c:
        engine = running.runtime.engines[0]
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert c.get("/ready").status_code == 200
        # An in-flight request when the engine dies ends at once with 503, it does not hang.
        httpx.post(f"{engine.url}/fake/mode", json={"mode": "hang"})
        results: list[httpx.Response] = []
        t = threading.Thread(target=lambda: results.append(
            c.post("/v1/chat/completions", json=CHAT)))
        t.start()
        time.sleep(0.3)
        killed_at = time.monotonic()
        os.kill(engine.pid, signal.SIGKILL)
        t.join(5)
        assert results and results[0].status_code == 503, results
        assert time.monotonic() - killed_at < 1.0
        # While it restarts: fast 503s and /ready false.
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["code"] == 503
        assert c.get("/ready").status_code == 503
        assert "calibserve_engine_up{model=\"m\"} 0.0" in c.get("/metrics").text
        deadline = time.monotonic() + 30
        while c.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        text = c.get("/metrics").text
        assert total(text, "calibserve_engine_restarts_total", model="m") == 1
        assert total(text, "calibserve_engine_up", model="m") == 1
        pid = engine.pid
    # Shutdown stops the engine (no orphan left behind).
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize(("free_form", "verify"), [("verify", True), ("mean", False)])
def test_a_managed_tier_that_serves_verify_starts_its_engine_for_it(
        tmp_path: Path, free_form: str, verify: bool) -> None:
    from calibserve.routing import RoutingMetrics
    from calibserve.server.config import TierSettings
    from calibserve.server.metrics import ServerMetrics, server_registry
    from calibserve.server.runtime import TierRuntime

    doc = tmp_path / "calibration.json"
    doc.write_text(json.dumps({"version": 2, "methods": {"mean": {}, free_form: {}},
                               "multiple_choice": "mean", "free_form": free_form}))
    registry = server_registry()
    tier = TierRuntime(TierSettings(name="t", model=tmp_path, calibration=doc),
                       ServerMetrics(registry), "t", RoutingMetrics(registry))
    assert tier.engine is not None and tier.engine.verify is verify

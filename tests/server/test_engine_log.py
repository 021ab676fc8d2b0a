"""An engine's log file: where it goes, what is read back from it, and the run directories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from calibserve.server.config import ServerSettings
from calibserve.server.engine_log import (
    EngineLog,
    engine_output,
    failure_reason,
    log_path,
    prune_runs,
    run_dir,
)

# The end of what vLLM 0.32 (CPU) prints for `--model` on a directory with no config.json.
VLLM_BAD_MODEL = """\
  File "/venv/.../vllm/engine/arg_utils.py", line 1955, in create_model_config
    return ModelConfig(
           ^^^^^^^^^^^^
  File "/venv/.../pydantic/_internal/_dataclasses.py", line 121, in __init__
    s.__pydantic_validator__.validate_python(ArgsKwargs(args, kwargs), self_instance=s)
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, Invalid repository ID or local directory specified: '/tmp/empty'.
Please verify the following requirements:
1. Provide a valid Hugging Face repository ID.
2. Specify a local directory that contains a recognized configuration file.
 [type=value_error, input_value=ArgsKwargs((), {'model': ...}), input_type=ArgsKwargs]
    For further information visit https://errors.pydantic.dev/2.14/v/value_error
""".splitlines()


def test_the_reason_is_the_last_exception_line_with_what_pydantic_adds() -> None:
    assert failure_reason(VLLM_BAD_MODEL) == (
        "ValidationError: 1 validation error for ModelConfig: Value error, Invalid repository "
        "ID or local directory specified: '/tmp/empty'.")
    assert failure_reason(["loading", "torch.OutOfMemoryError: CUDA out of memory", "done"]) \
        == "OutOfMemoryError: CUDA out of memory"
    assert failure_reason(["INFO starting", "INFO still starting"]) is None
    assert len(failure_reason(["ValueError: " + "x" * 1000]) or "") == 300


def test_a_pointer_to_the_root_cause_yields_to_the_root_cause() -> None:
    lines = ["ValueError: head_dim 16 is not supported", "Traceback (most recent call last):",
             '  File "core.py", line 1',
             "RuntimeError: Engine core initialization failed. See root cause above."]
    assert failure_reason(lines) == "ValueError: head_dim 16 is not supported"
    assert failure_reason(lines[1:]) == lines[-1]  # nothing better: the pointer itself


def test_log_file_names_are_safe_and_in_this_runs_directory(tmp_path: Path) -> None:
    assert log_path("org/model:v1", tmp_path) == tmp_path / "engine-org_model_v1.log"
    assert log_path("...", tmp_path).name == "engine-engine.log"
    default = log_path("m")
    assert default.parent == run_dir() and default.is_absolute()
    assert run_dir().name.endswith(f"-{os.getpid()}") and run_dir().parent.name == "runs"


def test_tail_is_this_starts_output_and_notes_stay_out(tmp_path: Path) -> None:
    log = EngineLog(tmp_path / "deep" / "engine-m.log")
    handle = log.open("python -m vllm ... (first start)")  # creates the directory
    handle.write(b"first start's line\nValueError: first failure\n")
    handle.close()
    log.note("exited with code 1")
    handle = log.open("python -m vllm ... (second start)")
    handle.write(b"second start's line\n")
    handle.close()
    log.note("was killed by SIGKILL")
    assert log.tail() == ["second start's line"]
    assert log.reason() is None  # the first start's error is not this one's
    text = log.path.read_text()
    assert "first failure" in text and "(second start)" in text and "SIGKILL" in text
    assert EngineLog(tmp_path / "missing.log").tail() == []


def test_tail_of_a_long_log_reads_only_its_end(tmp_path: Path) -> None:
    log = EngineLog(tmp_path / "engine-m.log")
    handle = log.open("start")
    handle.write(b"".join(b"stats line %d\n" % i for i in range(20_000)))
    handle.write(b"RuntimeError: the end\n")
    handle.close()
    assert log.tail(2) == ["stats line 19999", "RuntimeError: the end"]
    assert log.reason() == "RuntimeError: the end"


def test_old_runs_are_pruned_unless_their_process_lives(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    names = [f"2026010{i}-000000-{gone}" for i in range(1, 6)]
    live = f"20260100-000000-{os.getpid()}"  # the oldest, but its process is running
    for name in [*names, live, "notes"]:
        (tmp_path / name).mkdir()
    removed = prune_runs(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == names[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, *names[3:], "notes"])


def test_the_first_engine_of_a_run_prunes_the_runs_beside_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALIBSERVE_HOME", str(tmp_path))
    run_dir.cache_clear()
    try:
        runs = tmp_path / "runs"
        old = [runs / f"2020010{i}-000000-999999999" for i in range(3)]
        for path in old:
            path.mkdir(parents=True)
        monkeypatch.setattr("calibserve.server.engine_log.KEEP_RUNS", 2)
        EngineLog(log_path("m")).open("start").close()
        assert run_dir().is_dir() and run_dir().parent == runs
        assert [path.exists() for path in old] == [False, False, True]
    finally:
        run_dir.cache_clear()


def test_engine_output_reaches_every_managed_engine(tmp_path: Path) -> None:
    settings = ServerSettings.model_validate({"models": [
        {"name": "a", "model": str(tmp_path), "escalate_to": [
            {"name": "b", "model": str(tmp_path)}, {"name": "c", "upstreams": ["http://x"]}]},
        {"name": "d", "model": str(tmp_path), "engine": {"console": True}},
    ]})
    assert engine_output(settings) is settings
    out = engine_output(settings, console=True, log_dir=tmp_path / "logs")
    a, d = out.models
    for engine in (a.engine, a.escalate_to[0].engine, d.engine):
        assert engine.console and engine.log_dir == tmp_path / "logs"
    assert a.escalate_to[1].engine.log_dir is None  # an external tier has no engine
    kept = engine_output(settings, log_dir=tmp_path)
    assert kept.models[1].engine.console and not kept.models[0].engine.console

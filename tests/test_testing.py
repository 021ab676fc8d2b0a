"""calibserve.testing: the support tests and benchmarks share runs what the product runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibserve.server.config import EngineSettings
from calibserve.server.engine import build_command, cuda_available
from calibserve.testing.vllm_process import VLLMProcess


@pytest.mark.parametrize("verify", [False, True])
def test_the_test_engine_is_the_command_calibserve_serve_launches(tmp_path: Path,
                                                                   verify: bool) -> None:
    proc = VLLMProcess(tmp_path, "m", tmp_path, max_model_len=256, enforce_eager=True,
                       extra_args=("--seed", "1"), verify=verify)
    cmd, env = proc.command()
    settings = EngineSettings(max_model_len=256, extra_args=["--enforce-eager", "--seed", "1"])
    served, served_env = build_command(tmp_path, "m", "127.0.0.1", proc.port, settings,
                                       cuda_available(), verify)
    assert cmd == served
    # The environment too (the CPU engine's KV cache and worker placement), log level aside.
    assert {k: v for k, v in env.items() if k != "VLLM_LOGGING_LEVEL"} == {
        k: v for k, v in served_env.items() if k != "VLLM_LOGGING_LEVEL"}
    assert "--disable-uvicorn-access-log" in cmd and cmd[cmd.index("--port") + 1] == str(proc.port)


def test_tests_and_benchmarks_do_not_import_each_other() -> None:
    repo = Path(__file__).resolve().parent.parent
    offenders = [
        str(path.relative_to(repo))
        for folder, other in (("tests", "benchmarks"), ("benchmarks", "tests"))
        for path in (repo / folder).rglob("*.py")
        for line in path.read_text().splitlines()
        if line.lstrip().startswith((f"from {other}.", f"import {other}", f"from {other} "))]
    assert offenders == []


class _Item:
    """What the ordering hook reads of a pytest item: its markers."""

    def __init__(self, name: str, *markers: str) -> None:
        self.name, self.markers = name, set(markers)

    def get_closest_marker(self, name: str) -> object | None:
        return name if name in self.markers else None


def test_engine_tests_without_the_demo_world_go_first_and_nothing_else_moves() -> None:
    from calibserve.testing.fixtures import _heavy_without_the_demo_world_first

    items = [_Item("a"), _Item("e1", "vllm", "demo"), _Item("b", "demo"),
             _Item("e2", "vllm"), _Item("e3", "vllm", "demo"), _Item("c"), _Item("e4", "vllm")]
    _heavy_without_the_demo_world_first(items)  # type: ignore[arg-type]
    assert [i.name for i in items] == ["a", "e2", "b", "e4", "e1", "c", "e3"]

"""`--evaluator`: its automatic default and the refusals that need no engine (each names its flag,
exits 2, writes nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from calibserve.merge.cli import Evaluator, evaluator_decision, merge_command
from calibserve.merge.config import build_config
from calibserve.merge.errors import InvalidConfig

runner = CliRunner()


def _app(why_not: str | None) -> typer.Typer:
    app = typer.Typer(add_completion=False)
    app.command("merge")(merge_command(None, lambda: why_not))
    return app


def _args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--base", str(world["base"]), "--aligned", str(world["aligned"]), "--data",
            str(world["data"]), "--out", str(out), "--quiet", *extra]


def test_vllm_is_refused_where_it_cannot_run(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(_app("vLLM is not installed"), _args(tiny_world, out, "--evaluator",
                                                                "vllm"))
    assert result.exit_code == 2
    assert result.output.strip() == ("Error: Invalid value for '--evaluator': vLLM is not "
                                     "installed")
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_auto_is_vllm_where_an_engine_can_run_and_transformers_otherwise() -> None:
    assert evaluator_decision(Evaluator.auto, lambda: None)[0] == "vllm"
    used, line = evaluator_decision(Evaluator.auto, lambda: "vLLM is not installed")
    assert (used, line) == ("transformers", "evaluator: transformers (auto: vLLM is not "
                                            "installed)")
    assert evaluator_decision(Evaluator.transformers, lambda: None)[0] == "transformers"
    assert evaluator_decision(Evaluator.vllm, lambda: None)[0] == "vllm"
    with pytest.raises(InvalidConfig) as err:
        evaluator_decision(Evaluator.vllm, lambda: "vLLM is not installed")
    assert err.value.param == "--evaluator"


def test_the_default_runs_the_reference_where_vllm_is_missing_and_says_so(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = [a for a in _args(tiny_world, out, "--grid", "0,1", "--no-refine") if a != "--quiet"]
    result = runner.invoke(_app("vLLM is not installed"), args)
    assert result.exit_code == 0, result.output
    line = "evaluator: transformers (auto: vLLM is not installed)"
    assert line in result.output.splitlines()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["evaluator"] == "transformers" and line in report["notes"]


def test_diversity_is_measured_by_either_evaluator(tiny_world: dict[str, Path],
                                                   tmp_path: Path) -> None:
    for evaluator in ("transformers", "vllm"):
        config = build_config(base=str(tiny_world["base"]), aligned=str(tiny_world["aligned"]),
                              data=tiny_world["data"], out=tmp_path / evaluator,
                              diversity=True, evaluator=evaluator)
        assert config.diversity and config.evaluator == evaluator


def test_an_unknown_evaluator_is_refused(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(_app(None), _args(tiny_world, tmp_path / "o", "--evaluator", "onnx"))
    assert result.exit_code == 2
    assert "--evaluator" in result.output


def test_a_dry_run_plans_the_vllm_evaluator_without_vllm(tiny_world: dict[str, Path],
                                                         tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = runner.invoke(_app("vLLM is not installed"), _args(tiny_world, out, "--dry-run",
                                                                "--evaluator", "vllm"))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("memory plan") and not out.exists()


def test_the_ray_backend_without_ray_is_refused_naming_the_flag() -> None:
    import importlib.util

    from calibserve.merge.engine import check_backend

    if importlib.util.find_spec("ray") is not None:
        pytest.skip("Ray is installed here: the refusal cannot happen")
    check_backend("mp")
    check_backend(None)
    with pytest.raises(InvalidConfig) as err:
        check_backend("ray")  # the engine's first step (VllmEvaluator.__init__)
    assert err.value.param == "--distributed-executor-backend" and "ray" in err.value.message

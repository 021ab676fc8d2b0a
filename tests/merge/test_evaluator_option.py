"""`--evaluator`: refusals that need no engine (each names its flag, exits 2, writes nothing)."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from calibserve.merge.cli import merge_command

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


def test_diversity_needs_the_transformers_evaluator(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    result = runner.invoke(_app(None), _args(tiny_world, tmp_path / "o", "--evaluator", "vllm",
                                             "--diversity"))
    assert result.exit_code == 2
    assert "Invalid value for '--diversity'" in result.output


def test_an_unknown_evaluator_is_refused(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(_app(None), _args(tiny_world, tmp_path / "o", "--evaluator", "onnx"))
    assert result.exit_code == 2
    assert "--evaluator" in result.output

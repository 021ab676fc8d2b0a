"""`calibserve demo build`: bad arguments fail cleanly, a good run prints the models' table."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from calibserve.demo.cli import app

runner = CliRunner()


def test_seed_not_an_integer() -> None:
    result = runner.invoke(app, ["build", "--seed", "abc"])
    assert result.exit_code != 0
    assert "--seed" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_unwritable_out(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = runner.invoke(app, ["build", "--out", str(blocker / "world")])
    assert result.exit_code != 0
    assert "--out" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_bad_settings_file(tmp_path: Path) -> None:
    bad = tmp_path / "s.json"
    bad.write_text('{"pretrain": {"steps": -1}}')
    result = runner.invoke(app, ["build", "--settings", str(bad)])
    assert result.exit_code != 0
    assert "--settings" in result.output
    assert "Traceback" not in result.output


def test_build_prints_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from calibserve.demo import tiny_settings

    monkeypatch.setenv("CALIBSERVE_HOME", str(tmp_path / "home"))
    settings = tmp_path / "tiny.json"
    settings.write_text(tiny_settings().model_dump_json())
    out = tmp_path / "world"
    result = runner.invoke(
        app, ["build", "--out", str(out), "--settings", str(settings), "--quiet"],
        env={"COLUMNS": "120"},
    )
    assert result.exit_code == 0, result.output
    for name in ("base", "aligned", "expert"):
        assert name in result.output
    assert "ECE" in result.output
    assert "long-tail acc." in result.output  # the tiny world has one long-tail entity a split
    assert str(out.resolve()) in result.output.replace("\n", "")
    assert (out / "world.json").is_file()

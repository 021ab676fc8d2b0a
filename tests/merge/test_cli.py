"""`calibserve merge` through typer: options, clean errors naming the flag, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from calibserve.merge.cli import app

runner = CliRunner()


def _args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--base",
        str(world["base"]),
        "--aligned",
        str(world["aligned"]),
        "--data",
        str(world["data"]),
        "--out",
        str(out),
        "--evaluator",  # the reference: these tests start no engine (auto is vllm where installed)
        "transformers",
        *extra,
    ]


def test_help_lists_the_documented_options() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "240", "NO_COLOR": "1"})
    assert result.exit_code == 0
    for flag in (
        "--base",
        "--aligned",
        "--data",
        "--out",
        "--grid",
        "--method",
        "--select",
        "--tolerance",
        "--calibrator",
        "--diversity",
        "--no-diversity",
        "--refine",
        "--no-refine",
        "--device",
        "--dtype",
        "--batch-size",
        "--shard-size",
        "--target-accuracy",
        "--free-form",
        "--no-free-form",
        "--short-answers",
        "--no-short-answers",
        "--grader",
        "--max-new-tokens",
    ):
        assert flag in result.output, flag


def test_bad_arguments_name_the_flag_and_exit_non_zero(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    cases = {
        "--grid": ["--grid", "0:1"],
        "--shard-size": ["--shard-size", "big"],
        "--select": ["--select", "best"],
        "--target-accuracy": ["--target-accuracy", "1.5"],
        "--grader": ["--grader", "fuzzy"],
        "--max-new-tokens": ["--max-new-tokens", "0"],
    }
    for flag, extra in cases.items():
        result = runner.invoke(app, _args(tiny_world, tmp_path / "o", *extra))
        assert result.exit_code == 2, (flag, result.output)
        assert f"Invalid value for '{flag}'" in result.output, result.output
        assert "Traceback" not in result.output
    missing = runner.invoke(
        app,
        [
            "--base",
            str(tmp_path / "nope"),
            "--aligned",
            str(tiny_world["aligned"]),
            "--data",
            str(tiny_world["data"]),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert missing.exit_code == 2 and "'--base'" in missing.output
    assert "Traceback" not in missing.output
    bad_method = runner.invoke(app, _args(tiny_world, tmp_path / "o", "--method", "ties"))
    assert bad_method.exit_code == 2 and "--method" in bad_method.output
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_a_merge_through_the_cli(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = runner.invoke(
        app,
        _args(
            tiny_world,
            out,
            "--grid",
            "0,0.5,1",
            "--no-refine",
            "--method",
            "slerp",
            "--calibrator",
            "platt",
            "--select",
            "min-ece",
            "--target-accuracy",
            "0.3",
            "--quiet",
        ),
    )
    assert result.exit_code == 0, result.output
    cal = json.loads((out / "model" / "calibration.json").read_text())
    assert cal["version"] == 2 and cal["methods"]["answer"]["calibrator"]["type"] == "platt"
    assert cal["merge"]["method"] == "slerp" and cal["merge"]["rule"] == "min-ece"
    report = json.loads((out / "report.json").read_text())
    assert [p["lambda"] for p in report["points"]] == [0.0, 0.5, 1.0]
    assert report["selected"]["metrics"]["ece"] == min(p["ece"] for p in report["points"])
    again = runner.invoke(app, _args(tiny_world, out, "--quiet"))
    assert again.exit_code == 2 and "'--out'" in again.output  # no silent overwrite


def test_calibrate_fits_one_checkpoint_and_refuses_bad_arguments(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    from calibserve.cli import app as main_app

    out = tmp_path / "cal" / "aligned.json"
    args = ["calibrate", "--model", str(tiny_world["aligned"]), "--data", str(tiny_world["data"]),
            "--out", str(out)]
    ok = runner.invoke(main_app, [*args, "--calibrator", "platt", "--target-accuracy", "0.3"])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(out.read_text())
    answer = doc["methods"]["answer"]
    assert doc["merge"] is None and doc["version"] == 2
    assert answer["calibrator"] is None or answer["calibrator"]["type"] == "platt"
    assert answer["fit"]["n"] > 0
    before = out.read_bytes()
    cases = {
        "--out": [*args],  # exists, no --overwrite
        "--model": ["calibrate", "--model", str(tmp_path / "nope"), "--data",
                    str(tiny_world["data"]), "--out", str(tmp_path / "x.json")],
        "--data": ["calibrate", "--model", str(tiny_world["aligned"]), "--data",
                   str(tmp_path), "--out", str(tmp_path / "x.json")],
        "--target-accuracy": [*args[:-1], str(tmp_path / "y.json"), "--target-accuracy", "1.5"],
    }
    for flag, argv in cases.items():
        result = runner.invoke(main_app, argv)
        assert result.exit_code == 2, (flag, result.output)
        assert f"Invalid value for '{flag}'" in result.output, result.output
        assert "Traceback" not in result.output
    assert out.read_bytes() == before  # refused runs change nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal"]
    again = runner.invoke(main_app, [*args, "--overwrite"])
    assert again.exit_code == 0, again.output


def test_calibrate_refuses_free_form_methods_it_cannot_fit_before_writing(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from calibserve.cli import app as main_app

    data = tmp_path / "data"
    shutil.copytree(tiny_world["data"], data)
    (data / "short_calibrate.jsonl").write_text(
        json.dumps({"question": "colour of w1 ?", "answer": "w2"}) + "\n")
    out = tmp_path / "cal.json"
    base = ["calibrate", "--model", str(tiny_world["aligned"]), "--data", str(data),
            "--out", str(out)]
    cases = {
        # the tiny word-level tokenizer has no yes/no token: verify cannot be read
        "--verify": [*base, "--verify"],
        "--free-form-method": [*base, "--free-form-method", "answer"],
        "--consistency-k": [*base, "--consistency-k", "3"],
    }
    for flag, argv in cases.items():
        result = runner.invoke(main_app, argv)
        assert result.exit_code == 2, (flag, result.output)
        assert f"Invalid value for '{flag}'" in result.output, result.output
        assert "Traceback" not in result.output
        assert not out.exists()
    result = runner.invoke(main_app, [*base, "--verify"])
    assert "no single token for yes and no" in result.output


def test_merge_free_form_is_checked_before_anything_is_written(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    from calibserve.cli import app as main_app

    out = tmp_path / "out"
    # the data has multiple-choice items only: nothing to fit the free-form methods on
    result = runner.invoke(main_app, ["merge", *_args(tiny_world, out, "--free-form",
                                                      "--grid", "0,1", "--quiet")])
    assert result.exit_code == 2 and "Invalid value for '--free-form'" in result.output
    assert "short-answer" in result.output and "Traceback" not in result.output
    # merge's own command (no serving path to run the fit with) refuses the flag
    result = runner.invoke(app, _args(tiny_world, out, "--free-form", "--quiet"))
    assert result.exit_code == 2 and "Invalid value for '--free-form'" in result.output
    assert not out.exists()


def test_a_failed_after_write_step_leaves_out_unpublished(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    from calibserve.merge.config import build_config
    from calibserve.merge.pipeline import run_merge

    out = tmp_path / "out"
    seen: list[Path] = []

    def step(model_dir: Path, data_dir: Path) -> None:
        seen.append(model_dir)
        assert (model_dir / "calibration.json").is_file() and data_dir == tiny_world["data"]
        raise RuntimeError("engine died")

    config = build_config(base=str(tiny_world["base"]), aligned=str(tiny_world["aligned"]),
                          data=tiny_world["data"], out=out, grid="0,1", refine=False)
    with pytest.raises(RuntimeError, match="engine died"):
        run_merge(config, progress=False, after_write=step)
    assert seen and not out.exists()  # the written model stayed staged: OUT never looks done
    assert run_merge(config, progress=False, after_write=lambda m, d: None) == out.resolve()
    assert (out / "model" / "calibration.json").is_file()


def test_free_form_fit_is_automatic_and_said_in_one_line(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    import typer

    from calibserve.merge.cli import merge_command
    from tests.merge.conftest import write_short_answers

    short = write_short_answers(Path(shutil.copytree(tiny_world["data"], tmp_path / "data")),
                                n=6)
    fitted: list[Path] = []

    def step(model_dir: Path, data_dir: Path) -> None:
        fitted.append(data_dir)

    def command(engine: str | None) -> typer.Typer:
        cmd = typer.Typer(add_completion=False)
        cmd.command("merge")(merge_command(step, lambda: engine))
        return cmd

    def run(cli: typer.Typer, data: Path, name: str, *extra: str) -> tuple[str, dict]:
        out = tmp_path / name
        args = _args({**tiny_world, "data": data}, out, "--grid", "0,1", "--no-refine",
                     "--max-new-tokens", "2", *extra)
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
        lines = [ln for ln in result.output.splitlines() if ln.startswith("free-form fit:")]
        assert len(lines) == 1, result.output
        return lines[0], json.loads((out / "report.json").read_text())

    # short answers and an engine: on, without the flag
    line, report = run(command(None), short, "auto-on")
    assert line.startswith("free-form fit: on (6 short-answer items") and "auto" in line
    assert fitted == [short] and line in report["notes"]
    # no short answers: off, and why
    line, report = run(command(None), tiny_world["data"], "no-short")
    assert line.startswith("free-form fit: off") and "no short-answer items" in line
    assert len(fitted) == 1 and line in report["notes"]
    # no engine: off, and why
    line, _ = run(command("vLLM is not installed"), short, "no-engine")
    assert line == "free-form fit: off (vLLM is not installed)" and len(fitted) == 1
    # the flags still force it
    line, _ = run(command(None), short, "forced-off", "--no-free-form")
    assert line == "free-form fit: off (--no-free-form)" and len(fitted) == 1
    line, _ = run(command(None), short, "forced-on", "--free-form")
    assert len(fitted) == 2 and "--free-form" in line
    # --quiet prints nothing but errors; the line is still in the report
    quiet = runner.invoke(command(None), _args({**tiny_world, "data": short}, tmp_path / "q",
                                               "--grid", "0,1", "--no-refine", "--quiet",
                                               "--max-new-tokens", "2"))
    assert quiet.exit_code == 0 and "free-form fit" not in quiet.output
    assert any(n.startswith("free-form fit: on") for n in
               json.loads((tmp_path / "q" / "report.json").read_text())["notes"])
    # forcing it where no engine can run is refused before anything is written
    refused = runner.invoke(command("vLLM is not installed"),
                            _args({**tiny_world, "data": short}, tmp_path / "r", "--free-form"))
    assert refused.exit_code == 2 and "Invalid value for '--free-form'" in refused.output
    assert "vLLM is not installed" in refused.output and not (tmp_path / "r").exists()
    # merge's own command has no serving path: auto is off and says so
    line, _ = run(app, short, "own-command")
    assert line.startswith("free-form fit: off") and "no serving path" in line

"""`calibserve serve` flags and YAML config -> ServerSettings (uvicorn itself is not started)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import calibserve.server.cli
from calibserve.server.config import ServerSettings


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[ServerSettings]:
    seen: list[ServerSettings] = []
    monkeypatch.setattr(calibserve.server.cli, "run_server", seen.append)
    return seen


def invoke(*args: str, env: dict[str, str] | None = None) -> object:
    return CliRunner().invoke(calibserve.server.cli.app, ["serve", *args], env=env)


def test_model_dir_flags(tmp_path: Path, captured: list[ServerSettings]) -> None:
    model = tmp_path / "run1" / "model"
    model.mkdir(parents=True)
    expert = tmp_path / "expert"
    expert.mkdir()
    result = invoke("--model", str(model), "--port", "18399", "--escalate-to", str(expert),
                    "--threshold", "0.6", "--stream-mode", "prefix:2", "--api-key", "a,b",
                    "--feedback-key", "fb", env={"CALIBSERVE_SIGNING_KEY": "from-env"})
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    (s,) = captured
    assert s.port == 18399 and s.host == "0.0.0.0"
    assert s.api_keys == ["a", "b"] and s.feedback_keys == ["fb"]
    assert s.signing_key == "from-env"
    (m,) = s.models
    assert m.name == "run1"  # OUT/model is named after OUT
    assert m.model == model and m.threshold == 0.6 and m.stream_mode == "prefix:2"
    assert m.resolved_policy() == "threshold"
    assert [t.name for t in m.escalate_to] == ["expert"] and m.escalate_to[0].managed


def test_upstream_flags(captured: list[ServerSettings]) -> None:
    result = invoke("--upstream", "http://a:8000,http://b:8000/", "--upstream", "http://c:1",
                    "--served-model-name", "merged", "--escalate-to", "https://api.x.com/v1",
                    "--threshold", "auto", "--target-accuracy", "0.8")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    (m,) = captured[0].models
    assert m.upstreams == ["http://a:8000", "http://b:8000", "http://c:1"]
    assert m.threshold == "auto" and m.target_accuracy == 0.8
    assert m.escalate_to[0].upstreams == ["https://api.x.com/v1"]


def test_yaml_config_with_relative_paths(tmp_path: Path, captured: list[ServerSettings]) -> None:
    (tmp_path / "m").mkdir()
    config = tmp_path / "calibserve.yaml"
    config.write_text(
        "port: 18398\n"
        "api_keys: [k1]\n"
        "models:\n"
        "  - name: merged\n"
        "    model: m\n"
        "    engine: {max_model_len: 128}\n"
        "  - name: remote\n"
        "    upstreams: http://r1:8000, http://r2:8000\n"
        "    upstream_model: big\n"
        "    policy: never\n"
    )
    result = invoke("--config", str(config), "--port", "18397")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    s = captured[0]
    assert s.port == 18397  # flags win over the file
    assert s.api_keys == ["k1"]
    assert s.models[0].model == tmp_path / "m"
    assert s.models[0].engine.max_model_len == 128
    assert s.models[1].upstreams == ["http://r1:8000", "http://r2:8000"]


def test_errors(tmp_path: Path, captured: list[ServerSettings]) -> None:
    assert invoke().exit_code != 0  # type: ignore[attr-defined]
    assert invoke("--model", str(tmp_path / "missing")).exit_code != 0  # type: ignore[attr-defined]
    both = invoke("--model", str(tmp_path), "--upstream", "http://x:1")
    assert both.exit_code != 0  # type: ignore[attr-defined]
    assert not captured
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: x\n")  # neither model nor upstreams
    with pytest.raises(ValueError, match="exactly one of"):
        ServerSettings.from_yaml(bad)


@pytest.mark.parametrize("content", [None, "{not json", '{"version": 99}'])
def test_a_bad_calibration_file_is_a_usage_error_naming_it(
        tmp_path: Path, captured: list[ServerSettings], content: str | None) -> None:
    cal = tmp_path / "calibration.json"
    if content is not None:
        cal.write_text(content)
    config = tmp_path / "c.yaml"
    config.write_text(f"models:\n  - name: x\n    upstreams: [\"http://127.0.0.1:9\"]\n"
                      f"    calibration: {cal.name}\n")  # relative: resolved against c.yaml
    result = invoke("--config", str(config))
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    # rich's error box wraps long paths: compare without its borders and any whitespace
    out = "".join(c for c in result.output if c not in "│ \n")  # type: ignore[attr-defined]
    assert "--config" in out and str(cal).replace(" ", "") in out and "Traceback" not in out
    assert not captured  # nothing started


def test_help_lists_the_documented_options() -> None:
    result = CliRunner().invoke(
        calibserve.server.cli.app, ["serve", "--help"], env={"COLUMNS": "200"}
    )
    out = result.output
    for option in ("--model", "--upstream", "--config", "--host", "--port",
                   "--served-model-name", "--escalate-to", "--threshold", "--target-accuracy",
                   "--stream-mode", "--api-key", "--feedback-key", "--signing-key"):
        assert option in out, option


def test_escalate_calibration_goes_to_the_tier_in_the_same_position(
        tmp_path: Path, captured: list[ServerSettings]) -> None:
    model, expert = tmp_path / "model", tmp_path / "expert"
    model.mkdir()
    expert.mkdir()
    cal = tmp_path / "expert-calibration.json"
    cal.write_text("{}")
    ok = invoke("--model", str(model), "--escalate-to", str(expert),
                "--escalate-calibration", str(cal))
    assert ok.exit_code == 0, ok.output  # type: ignore[attr-defined]
    (tier,) = captured[0].models[0].escalate_to
    assert tier.calibration_path() == cal  # not expert/calibration.json
    missing = invoke("--model", str(model), "--escalate-to", str(expert),
                     "--escalate-calibration", str(tmp_path / "nope.json"))
    too_many = invoke("--model", str(model), "--escalate-to", str(expert),
                      "--escalate-calibration", str(cal), "--escalate-calibration", str(cal))
    for result in (missing, too_many):
        assert result.exit_code != 0  # type: ignore[attr-defined]
        assert "--escalate-calibration" in result.output  # type: ignore[attr-defined]
        assert "Traceback" not in result.output  # type: ignore[attr-defined]
    assert len(captured) == 1


def test_engine_output_flags_reach_every_managed_engine(
        tmp_path: Path, captured: list[ServerSettings]) -> None:
    model, expert = tmp_path / "model", tmp_path / "expert"
    model.mkdir()
    expert.mkdir()
    result = invoke("--model", str(model), "--escalate-to", str(expert), "--port", "18397",
                    "--engine-console", "--engine-log-dir", str(tmp_path / "logs"))
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    (settings,) = captured
    engines = [settings.models[0].engine, settings.models[0].escalate_to[0].engine]
    assert all(e.console and e.log_dir == tmp_path / "logs" for e in engines)
    invoke("--model", str(model), "--port", "18397")
    assert not captured[1].models[0].engine.console  # off by default
    assert captured[1].models[0].engine.log_dir is None  # this run's directory

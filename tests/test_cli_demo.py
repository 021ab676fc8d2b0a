"""`calibserve demo` wiring: build (cached), merge (cached), fit free-form confidence, calibrate
the expert, serve both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import calibserve.demo as demo
import calibserve.demo_pipeline
import calibserve.server.cli
from calibserve.calibration import CalibrationDocument
from calibserve.cli import app


@pytest.mark.slow
def test_demo_serves_the_merge_and_a_calibrated_expert(
        demo_dir: Path, merged_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[tuple[Path, dict[str, Any]]] = []
    monkeypatch.setattr(demo, "build_world", lambda seed: demo_dir)
    monkeypatch.setattr(calibserve.demo_pipeline, "merge_demo", lambda world, progress: merged_dir)
    # The free-form fit starts an engine: tests/test_demo_pipeline.py covers it.
    monkeypatch.setattr(calibserve.demo_pipeline, "served_demo_model",
                        lambda world, merged: merged / "model")
    monkeypatch.setattr(calibserve.server.cli, "serve_model",
                        lambda model, **kw: served.append((Path(model), kw)))
    result = CliRunner().invoke(app, ["demo", "--port", "18398"])
    assert result.exit_code == 0, result.output
    ((model, kw),) = served
    assert model == merged_dir / "model" and kw["port"] == 18398
    assert kw["escalate_to"] == [str(demo_dir / "expert")] and kw["threshold"] == "auto"
    assert kw["report"] == merged_dir / "report.html"  # the ready block points at it
    (calibration,) = kw["escalate_calibration"]
    doc = CalibrationDocument.load(calibration)  # the cached fit may predate version 2
    fit = doc.method().fit
    assert doc.merge is None and fit is not None and fit.ece_calibrated < fit.ece_raw
    # What serve_model would build from these options: the expert tier carries that file.
    settings = calibserve.server.cli.settings_from_cli(model=model, **{k: v for k, v in kw.items()
                                                           if k not in ("host", "report")})
    (tier,) = settings.models[0].escalate_to
    assert tier.calibration_path() == Path(calibration)

"""End to end on the demo: `calibrate_with_serving` through a real vLLM CPU engine and
calibserve's own app; the fitted free-form calibrator is what a second served request gets."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from calibserve.calibration import CalibrationDocument, ServedMethod
from calibserve.fit.passes import ask_short_answers
from calibserve.fit.raw import method_raw
from calibserve.fit.serve_fit import calibrate_with_serving


@pytest.mark.vllm
def test_free_form_fit_through_the_serving_path(
    demo_dir: Path, merged_dir: Path, tmp_path: Path
) -> None:
    # calibserve's managed engine (what `calibserve calibrate` starts), not the `vllm_server`
    # fixture: the fit must go through the engine calibserve itself supervises.
    pytest.importorskip("vllm")
    model = merged_dir / "model"
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(demo_dir / "data" / "calibrate.jsonl", data / "calibrate.jsonl")
    lines = (demo_dir / "data" / "short_calibrate.jsonl").read_text().splitlines()
    random.Random(0).shuffle(lines)
    (data / "short_calibrate.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (data / "short_test.jsonl").write_text("\n".join(lines[40:60]) + "\n")
    out = tmp_path / "calibration.json"
    doc = calibrate_with_serving(model, data, out)
    assert CalibrationDocument.load(out) == doc
    ff = doc.method(doc.free_form)
    assert ff.calibrated and ff.fit is not None and ff.fit.n == 40 and ff.fit.held_out_ece
    assert doc.metrics["short_answer"]["test"]["n"] == 20
    assert doc.method("answer").fit is not None  # the option-letter fit is still there
    # Served with the new document: free-form replies get exactly the fitted map of their raw;
    # every reply's free-form statistic maps as fitted.
    questions = [json.loads(x)["question"] for x in lines[:10]]
    replies = ask_short_answers(questions, model_dir=model, calibration=out)
    served = ServedMethod.from_document(doc, doc.free_form)
    fitted = ff.calibration_map()
    assert fitted is not None
    for r in replies:
        raw = method_raw(r, doc.free_form, doc.quantile())
        assert served.score(raw) == pytest.approx(float(fitted.apply(raw)), abs=1e-12)
        if r.confidence["method"] == doc.free_form:
            assert r.confidence["calibrated"] is True
            assert r.confidence["score"] == pytest.approx(served.score(raw), abs=1e-9)


@pytest.mark.vllm
def test_merge_free_form_writes_a_model_with_both_calibrations(
    demo_dir: Path, tmp_path: Path
) -> None:
    # One command: the merge (multiple choice), then the free-form fit through a managed vLLM
    # engine on the written checkpoint, before OUT is published.
    pytest.importorskip("vllm")
    from typer.testing import CliRunner

    from calibserve.cli import app

    data = tmp_path / "data"
    data.mkdir()
    for name in ("select.jsonl", "calibrate.jsonl"):
        shutil.copy(demo_dir / "data" / name, data / name)
    lines = (demo_dir / "data" / "short_calibrate.jsonl").read_text().splitlines()
    (data / "short_calibrate.jsonl").write_text("\n".join(lines[:20]) + "\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "merge", "--base", str(demo_dir / "base"), "--aligned", str(demo_dir / "aligned"),
        "--data", str(data), "--out", str(out), "--grid", "0,1", "--no-refine", "--quiet",
        "--free-form", "--evaluator", "transformers"])
    assert result.exit_code == 0, result.output
    doc = CalibrationDocument.load(out / "model" / "calibration.json")
    assert doc.method("answer").fit is not None and doc.merge is not None
    short = doc.metrics["short_answer"]
    assert short["calibrate"]["n"] == 20
    for method in ("mean", "min", "first", "quantile"):
        fit = doc.method(method).fit
        assert fit is not None and fit.n == 20
    # The demo's word-level tokenizer has no yes/no token: verify is left out, and says why.
    assert "verify" not in doc.methods
    assert any("verify not fitted" in note for note in short["notes"])

"""`calibserve calibrate --max-error`: certified thresholds in the document, or a clean refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from calibserve.calibration import CalibrationDocument
from calibserve.calibration.guarantee import certify_threshold, clopper_pearson_upper

runner = CliRunner()


def _args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["calibrate", "--model", str(world["aligned"]), "--data", str(world["data"]),
            "--out", str(out), "--calibrator", "platt", *extra]


@pytest.mark.slow
def test_calibrate_records_the_certificate(demo_dir: Path, tmp_path: Path) -> None:
    from calibserve.cli import app

    out = tmp_path / "cal.json"
    world = {"aligned": demo_dir / "expert", "data": demo_dir / "data"}
    result = runner.invoke(app, _args(world, out, "--no-free-form", "--max-error", "0.3",
                                      "--delta", "0.2"))
    assert result.exit_code == 0, result.output
    assert "certified threshold" in result.output
    doc = CalibrationDocument.load(out)
    (g,) = doc.method("answer").guarantees
    assert (g.max_error, g.delta) == (0.3, 0.2)
    assert g.bound == pytest.approx(clopper_pearson_upper(g.kept_errors, g.kept, 0.2))
    assert g.bound <= 0.3 and g.n == doc.method("answer").fit.n  # type: ignore[union-attr]
    assert g.coverage == pytest.approx(g.kept / g.n)
    raw = json.loads(out.read_text())["methods"]["answer"]["guarantees"][0]
    assert set(raw) == {"max_error", "delta", "threshold", "coverage", "bound", "n", "kept",
                        "kept_errors"}
    assert doc.method("answer").guarantee_for(0.5) == g
    assert doc.method("answer").guarantee_for(0.25) is None
    # A batch certificate: recorded and printed (a looser alpha: the batch target at 0.3 is
    # below what this model's top answers can vouch for).
    batch = runner.invoke(app, _args(world, out, "--no-free-form", "--max-error", "0.5",
                                     "--delta", "0.2", "--batch", "100", "--overwrite"))
    assert batch.exit_code == 0, batch.output
    assert "for max_error 0.5 in any batch of at least 100 kept answers" in batch.output
    (b,) = CalibrationDocument.load(out).method("answer").guarantees
    assert (b.max_error, b.delta, b.batch) == (0.5, 0.2, 100)
    assert b.bound <= (b.batch_target or 0) < 0.5


def test_calibrate_refuses_a_target_it_cannot_certify(tiny_world: dict[str, Path],
                                                      tmp_path: Path) -> None:
    from calibserve.cli import app

    out = tmp_path / "cal.json"
    result = runner.invoke(app, _args(tiny_world, out, "--max-error", "0.1"))
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--max-error'" in result.output
    assert "Traceback" not in result.output
    assert "must escalate at least" in result.output and "method 'answer'" in result.output
    assert not out.exists()
    bad = runner.invoke(app, _args(tiny_world, out, "--max-error", "0.2", "--delta", "1.5"))
    assert bad.exit_code == 2 and "Invalid value for '--delta'" in bad.output
    assert "Traceback" not in bad.output and not out.exists()


def test_the_stated_minimum_escalation_rate_is_the_models_own() -> None:
    from calibserve.calibration.certified import GuaranteeTargets, refusals
    from calibserve.merge.calibrate import calibration_json, fit_calibration
    from calibserve.merge.evaluate import Scores

    rng = np.random.default_rng(3)
    conf = rng.random(400)
    correct = rng.random(400) < 0.6  # error 0.4 whatever the confidence says
    scores = Scores(conf, correct, np.zeros(400, np.int64))
    cal = fit_calibration(scores, "platt", [0.7], guarantees=GuaranteeTargets((0.1, 0.45)))
    assert [g.max_error for g in cal.guarantees] == [0.45]
    doc = calibration_json(cal, ["A", "B", "C", "D"], None, {})
    (refusal,) = refusals(doc, GuaranteeTargets((0.1,)))
    mu = 1 - correct.mean()
    assert refusal.startswith("0.1 for method 'answer'")
    assert f"at least {(mu - 0.1) / 0.9:.1%}" in refusal
    assert refusals(doc, GuaranteeTargets((0.45,))) == []
    # What was recorded is what the certificate of the calibrated confidence says.
    calibrated = cal.apply(conf)
    assert cal.guarantees[0].threshold == certify_threshold(calibrated, correct, 0.45).threshold


def merge_args(world: dict[str, Path], out: Path) -> list[str]:
    """A quick `calibserve merge` of the tiny world into `out` (no refinement, no free form)."""
    return ["--base", str(world["base"]), "--aligned", str(world["aligned"]),
            "--data", str(world["data"]), "--out", str(out), "--grid", "0,1", "--quiet",
            "--no-refine", "--no-short-answers", "--no-free-form", "--evaluator", "transformers"]


def test_merge_refuses_a_target_it_cannot_certify(tiny_world: dict[str, Path],
                                                  tmp_path: Path) -> None:
    from calibserve.merge.cli import app

    out = tmp_path / "out"
    args = merge_args(tiny_world, out)
    result = runner.invoke(app, [*args, "--max-error", "0.05"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--max-error'" in result.output and "Traceback" not in result.output
    assert "must escalate at least" in result.output
    assert not out.exists()
    bad = runner.invoke(app, [*args, "--max-error", "0.2", "--label-free", "--overwrite"])
    assert bad.exit_code == 2 and "Invalid value for '--max-error'" in bad.output


def test_batch_certificates_are_recorded_and_bad_batches_refused() -> None:
    from calibserve.calibration import CalibrationError
    from calibserve.calibration.certified import GuaranteeTargets
    from calibserve.calibration.guarantee import batch_error_target
    from calibserve.merge.calibrate import fit_calibration
    from calibserve.merge.evaluate import Scores

    rng = np.random.default_rng(5)
    conf = rng.random(1200)
    correct = rng.random(1200) < 0.4 + conf  # the most confident 40% always right
    scores = Scores(conf, correct, np.zeros(1200, np.int64))
    plain = fit_calibration(scores, "platt", [0.7], guarantees=GuaranteeTargets((0.2,)))
    batch = fit_calibration(scores, "platt", [0.7],
                            guarantees=GuaranteeTargets((0.2,), 0.1, 80))
    (g,) = batch.guarantees
    assert (g.max_error, g.delta, g.batch) == (0.2, 0.1, 80)
    assert g.batch_target == batch_error_target(0.2, 0.1, 80) and g.bound <= g.batch_target
    assert g.kept <= plain.guarantees[0].kept  # the batch promise costs coverage
    for bad, why in [(0, "batch must be"), (-1, "batch must be")]:
        with pytest.raises(CalibrationError, match=why):
            GuaranteeTargets((0.2,), 0.1, bad)
    with pytest.raises(CalibrationError, match="batch needs a max_error"):
        GuaranteeTargets((), 0.1, 50)


def test_calibrate_refuses_a_bad_batch_naming_it(tiny_world: dict[str, Path],
                                                 tmp_path: Path) -> None:
    from calibserve.cli import app

    out = tmp_path / "cal.json"
    for extra in (["--max-error", "0.2", "--batch", "0"], ["--batch", "50"]):
        result = runner.invoke(app, _args(tiny_world, out, *extra))
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--batch'" in result.output
        assert "Traceback" not in result.output and not out.exists()


def test_merge_refuses_a_bad_batch_naming_it(tiny_world: dict[str, Path],
                                             tmp_path: Path) -> None:
    from calibserve.merge.cli import app

    out = tmp_path / "out"
    args = merge_args(tiny_world, out)
    for extra in (["--max-error", "0.2", "--batch", "0"], ["--batch", "50"]):
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--batch'" in result.output
        assert "Traceback" not in result.output and not out.exists()


"""calibration.json for a checkpoint that is not a merge: the demo expert, the escalation tier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibserve.calibration import CalibrationDocument, OptionTemperature, Scorer
from calibserve.fit.multiple_choice import calibrate_checkpoint
from calibserve.merge.evaluate import MCEvaluator, load_items


@pytest.mark.slow
def test_the_demo_expert_gets_a_calibration_that_lowers_its_ece(demo_dir: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "expert.json"
    doc = calibrate_checkpoint(demo_dir / "expert", demo_dir / "data", out)
    assert json.loads(out.read_text()) == doc.to_dict() and doc.version == 2
    assert CalibrationDocument.load(out) == doc
    assert [p.name for p in tmp_path.iterdir()] == ["expert.json"]  # no temp file left behind
    assert doc.merge is None and doc.multiple_choice == "answer"
    fit = doc.method().fit
    assert fit is not None and fit.ece_calibrated < fit.ece_raw
    # The server's Scorer applies exactly what was fitted: recompute the test split's ECE.
    scorer = Scorer.from_document(doc)
    items, _ = load_items(demo_dir / "data" / "test.jsonl")
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "expert", dtype=torch.float32)
    scores = MCEvaluator(AutoTokenizer.from_pretrained(demo_dir / "expert"), items).score(model)
    assert scores.options is not None and fit.calibrator is not None
    raw = OptionTemperature(doc.temperature()).confidence(
        scores.options.logits, scores.options.prediction, scores.options.groups)
    served = np.asarray(scorer.calibrator.apply(raw))
    assert float(np.mean(served)) == pytest.approx(doc.metrics["test"]["mean_confidence"])
    thresholds = doc.method().thresholds
    assert thresholds == sorted(thresholds, key=lambda t: t.target_accuracy)


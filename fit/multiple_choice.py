"""`calibration.json` for a checkpoint that is not a merge: an escalation tier, say.

Same evaluation (chat-format multiple choice, the `answer` confidence) and same calibrator fit as a
merge's chosen point (merge/evaluate.py, merge/calibrate.py), so the server puts this model's
answers on the same calibrated scale as the merged model's. Without it a tier is served with the
`mean` confidence and the identity calibrator.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibserve.calibration import DEFAULT_TARGET_ACCURACIES, N_BINS, CalibrationDocument
from calibserve.calibration.certified import NO_GUARANTEES, GuaranteeTargets, refusals
from calibserve.merge.calibrate import CALIBRATORS, calibration_json, fit_calibration
from calibserve.merge.errors import InputNotFound, InvalidConfig, InvalidData, OutputExists
from calibserve.merge.evaluate import LETTERS, MCEvaluator, load_items, point_metrics


def check_inputs(model_dir: Path, data_dir: Path, out_file: Path, calibrator: str,
                 targets: Sequence[float], overwrite: bool) -> None:
    """Refuse bad arguments before anything is loaded or written (MergeError names the flag)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise InputNotFound(f"{model_dir} is not a checkpoint directory (no config.json)",
                            "--model")
    if not (Path(data_dir) / "calibrate.jsonl").is_file():
        raise InputNotFound(f"{data_dir} has no calibrate.jsonl", "--data")
    if Path(out_file).is_dir():
        raise InvalidConfig(f"{out_file} is a directory; give a file name", "--out")
    if Path(out_file).exists() and not overwrite:
        raise OutputExists(f"{out_file} exists (pass --overwrite to replace it)", "--out")
    if calibrator not in CALIBRATORS:
        raise InvalidConfig(f"unknown calibrator {calibrator!r}; valid: {', '.join(CALIBRATORS)}",
                            "--calibrator")
    if any(not 0 < t < 1 for t in targets):
        raise InvalidConfig("target accuracies must be between 0 and 1", "--target-accuracy")


def calibrate_checkpoint(
    model_dir: Path,
    data_dir: Path,
    out_file: Path,
    calibrator: str = "auto",
    targets: Sequence[float] = DEFAULT_TARGET_ACCURACIES,
    n_bins: int = N_BINS,
    guarantees: GuaranteeTargets = NO_GUARANTEES,
) -> CalibrationDocument:
    """Fit on `data_dir/calibrate.jsonl`, report `test.jsonl` too if present; write `out_file`
    atomically (temp file + rename) and return the document. A `guarantees` target the
    option-letter method cannot be certified for is refused (InvalidConfig, `--max-error`)
    before anything is written."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    items, _ = load_items(Path(data_dir) / "calibrate.jsonl")
    try:
        scores = MCEvaluator(tokenizer, items).score(model)
    except InvalidData as exc:  # the evaluator names merge's --aligned; here it is --model
        raise InvalidData(exc.message.replace("aligned tokenizer", "tokenizer"), "--model") from exc
    cal = fit_calibration(scores, calibrator, targets, n_bins, guarantees=guarantees)
    extra: dict[str, Any] = {}
    test_path = Path(data_dir) / "test.jsonl"
    if test_path.is_file():
        test_items, _ = load_items(test_path)
        raw = MCEvaluator(tokenizer, test_items).score(model)
        extra["test"] = point_metrics(cal.serve(raw), n_bins)
    n_options = max(len(it["choices"]) for it in items)
    doc = calibration_json(cal, LETTERS[:n_options], None, extra)  # merge: null, not a merge
    refuse_uncertified(doc, guarantees)
    doc.write(Path(out_file))
    return doc


def refuse_uncertified(doc: CalibrationDocument, guarantees: GuaranteeTargets) -> None:
    """InvalidConfig naming `--max-error` when a served method of `doc` could not be certified
    for a target of `guarantees` (with the minimum escalation rate the target would need)."""
    refused = refusals(doc, guarantees)
    if refused:
        raise InvalidConfig("cannot certify max_error " + "; ".join(refused), "--max-error")

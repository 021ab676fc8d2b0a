"""Why the demo's served free-form ECE misses issue 27's floor: does the split the map is fitted on
matter? Not a timed benchmark.

    python -m benchmarks.freeform.fit_splits [--model DIR] [--data DIR]

The served demo model (default: the newest `.calibserve/demo/served-*`, the one `make demo`
serves; its world's `data/` next to it) answers every short-answer split (`short_calibrate`,
`short_select`, `short_test`: greedy, 16 tokens, the raw `mean` confidence, graded as merge grades
them) and the multiple-choice splits (option letters). Then the map family the served document
chose for `mean` is fitted again on the calibrate split (what merge fits on), on the select split,
and on both, and each is judged on the test split: ECE (15 bins), Brier, log loss, AUROC, mean
confidence against accuracy. Each split asks about its own 40 entities, so splits differ in
difficulty by more than their item counts suggest; this shows by how much, and whether fitting on
other questions would have met the floor.

Writes benchmarks/results/freeform_fit_splits.json and prints the RESULTS.md lines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.common import machine, utc_now, write_json  # noqa: E402

SPLITS = ("calibrate", "select", "test")
FITS = {"calibrate": ("calibrate",), "select": ("select",), "calibrate + select":
        ("calibrate", "select")}
OUT = REPO / "benchmarks" / "results" / "freeform_fit_splits.json"


def newest_served() -> Path:
    served = sorted((REPO / ".calibserve" / "demo").glob("served-*/calibration.json"),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    if not served:
        raise SystemExit("no served demo model under .calibserve/demo: run `make demo` first")
    return served[0].parent


def score(model_dir: Path, data: Path) -> dict[str, Any]:
    """Per split: short answers (raw `mean` confidence, correct) and multiple-choice accuracy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibserve.calibration.grading import load_grader
    from calibserve.merge.evaluate import MCEvaluator, load_mc_items, short_answer_split
    from calibserve.merge.freeform import FreeFormEvaluator, stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict[str, Any] = {}
    for split in SPLITS:
        short = FreeFormEvaluator(tokenizer, short_answer_split(data, split), load_grader(None),
                                  stop_ids=stop_token_ids(tokenizer, model_dir)).score(model)
        mc = MCEvaluator(tokenizer, load_mc_items(data / f"{split}.jsonl")).score(model)
        out[split] = {"confidence": short.confidence, "correct": short.correct,
                      "mc_accuracy": float(np.mean(mc.correct))}
    return out


def judge(family: str, scores: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The map `family` fitted on each of FITS, judged on the test split."""
    from calibserve.calibration import auroc, brier, ece, nll
    from calibserve.calibration.family import fit_family

    test = scores["test"]
    out = {}
    for name, splits in FITS.items():
        conf = np.concatenate([scores[s]["confidence"] for s in splits])
        correct = np.concatenate([scores[s]["correct"] for s in splits])
        mapped = np.asarray(fit_family(family, conf, correct)[0].apply(test["confidence"]))
        y = test["correct"]
        out[name] = {"ece": ece(mapped, y), "brier": brier(mapped, y), "log_loss": nll(mapped, y),
                     "auroc": auroc(mapped, y), "mean_confidence": float(mapped.mean()),
                     "test_accuracy": float(y.mean()), "fit_accuracy": float(correct.mean()),
                     "n_fit": int(conf.size)}
    return out


def main(argv: list[str] | None = None) -> None:
    from calibserve.calibration import CalibrationDocument

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="a served demo model directory")
    ap.add_argument("--data", type=Path, default=None,
                    help="its world's data directory [default: from the model's name]")
    args = ap.parse_args(argv)
    model = args.model or newest_served()
    if not (model / "calibration.json").is_file():
        ap.error(f"--model: {model} is not a served model directory (no calibration.json)")
    if args.data is None and len(model.name.split("-")) < 3:
        ap.error(f"--data: give it; {model.name!r} is not named served-WORLD-... to find it")
    data = args.data or model.parent / model.name.split("-")[1] / "data"
    if not (data / "short_test.jsonl").is_file():
        ap.error(f"--data: {data} has no short_test.jsonl")
    family = str(CalibrationDocument.load(model / "calibration.json").to_dict()["methods"]["mean"]
                 ["calibrator"]["type"])
    scores = score(model, data)
    splits = {s: {"short_answer_accuracy": float(np.mean(scores[s]["correct"])),
                  "short_answers": int(scores[s]["correct"].size),
                  "mc_accuracy": scores[s]["mc_accuracy"]} for s in SPLITS}
    fits = judge(family, scores)
    result = {"machine": machine(), "date": utc_now(), "model": str(model.relative_to(REPO)),
              "family": family,
              "splits": splits, "fits": fits}
    write_json(OUT, result, indent=1)
    print(f"{result['machine']}, {result['date']}; {result['model']}, map family {family}")
    print("| split | short-answer accuracy | multiple-choice accuracy |\n|---|---|---|")
    for s, v in splits.items():
        print(f"| {s} | {v['short_answer_accuracy']:.3f} | {v['mc_accuracy']:.3f} |")
    print("\n| fitted on | test ECE | Brier | log loss | AUROC | mean confidence (test accuracy) |"
          "\n|---|---|---|---|---|---|")
    for name, v in fits.items():
        print(f"| {name} ({v['n_fit']}, {v['fit_accuracy']:.3f} right) | {v['ece']:.3f} | "
              f"{v['brier']:.3f} | {v['log_loss']:.3f} | {v['auroc']:.3f} | "
              f"{v['mean_confidence']:.3f} ({v['test_accuracy']:.3f}) |")


if __name__ == "__main__":
    main()

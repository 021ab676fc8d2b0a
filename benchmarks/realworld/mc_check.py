"""The lettered (multiple-choice) held-out split, scored the way the merge's sweep scores it, for
any checkpoints: the form seed 004 (CFT/RCFT) trains its calibration loss on, beside the
short-answer table (remedy_table), which asks free-form questions.

    .venv/bin/python -m benchmarks.realworld.mc_check MODEL_DIR [MODEL_DIR ...] \\
        [--data DIR] [--limit 300] [--out FILE]

Each checkpoint is loaded with transformers (float32, CPU unless CUDA is there) and scored by
`merge.evaluate.MCEvaluator`, the reference evaluator that measured the sweep's points: one user
message per item under the checkpoint's own chat template, the option letters' first-token
logprobs, prediction = the most likely option, confidence = its probability renormalised over
the options (what the server serves for option letters). The first `--limit` items of
`test.jsonl` are the merge report's held-out items (`--max-items` takes the first N), so its
`heldout.models` rows (base, aligned, selected) compare one to one. Metrics: accuracy, ECE
(15 bins), Brier, NLL, mean confidence; AUROC of right vs wrong.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "score_checkpoint"]


def score_checkpoint(model_dir: Path, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """MC metrics of one checkpoint on `items` (float32, the sweep's evaluator)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibserve.calibration import auroc
    from calibserve.merge.evaluate import MCEvaluator, point_metrics

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.eval()
    t0 = time.monotonic()
    scores = MCEvaluator(tokenizer, items, device=device).score(model)
    out: dict[str, Any] = {"model": str(model_dir), **point_metrics(scores)}
    out["auroc"] = auroc(scores.confidence, scores.correct)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.realworld.mc_check",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("models", nargs="+", type=Path, help="checkpoint directories")
    p.add_argument("--data", type=Path, default=Path(".calibserve/realworld/data/world_facts"),
                   help="a directory with test.jsonl (lettered items)")
    p.add_argument("--limit", type=int, default=300, help="the first N items (default 300)")
    p.add_argument("--out", type=Path, default=None, help="write the results here (JSON)")
    args = p.parse_args(argv)
    if args.limit < 1:
        p.error("argument --limit: must be at least 1")
    test = args.data / "test.jsonl"
    if not test.is_file():
        p.error(f"argument --data: {test} does not exist")
    missing = [str(m) for m in args.models if not (m / "config.json").is_file()]
    if missing:
        p.error(f"argument models: not checkpoints: {', '.join(missing)}")
    from calibserve.merge.evaluate import load_items

    items, _ = load_items(test, args.limit)
    rows = []
    for model in args.models:
        row = score_checkpoint(model, items)
        rows.append(row)
        print(f"{model.name}: accuracy {row['accuracy']:.3f}  ECE {row['ece']:.3f}  "
              f"Brier {row['brier']:.3f}  AUROC {row['auroc']:.3f}  "
              f"mean conf {row['mean_confidence']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    doc = {"items": str(test), "n": len(items),
           "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "rows": rows}
    if args.out is not None:
        from calibserve.publish import write_atomic

        write_atomic(args.out, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

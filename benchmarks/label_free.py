"""Label-free (DACA) vs labelled option temperature on a base/aligned pair, on the same held-out
items: the demo pair by default, or any pair (the real pair of issue 26: Gemma 3 270M and the
checkpoint `calibserve tune` built from it, on the world facts).

    .venv/bin/python benchmarks/label_free.py [--demo-dir DIR] [--json OUT]
    .venv/bin/python benchmarks/label_free.py --base B --aligned A --data DIR [--limit N]

The aligned demo model's option-letter confidence on the demo's multiple-choice test split:
raw (T = 1), with the option temperature fitted on the calibrate split's gold answers
(`OptionTemperature`, what `calibserve calibrate --calibrator option_temperature` fits), and
with DACA's temperature fitted on the same calibrate prompts with no labels against the base demo
model (`calibserve calibrate --label-free --reference base`). The agreement-free variant (every
item, the paper's naive alignment) is shown for comparison. Both models are scored as
`calibserve calibrate` scores the option-letter method: transformers in this process, the aligned
model's chat template for both (fit/label_free.py), not through vLLM.

Floor (issue 27): DACA's held-out ECE at most 1.5x the labelled temperature's, and below raw.
ECE is the 15-bin L1 ECE of `calibration.ece`; `expected ECE` measures against the demo's true
probability that the answered option is right (`p_true`: each question's answer is drawn from a
known distribution), a lower-variance view of the same calibration. Exit status 1 when the floor
is missed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibserve.calibration import N_BINS, OptionTemperature, auroc, brier, ece, nll
from calibserve.calibration.label_free import fit_daca
from calibserve.fit.label_free import fit_split, load_unlabelled
from calibserve.merge.evaluate import MCEvaluator, load_items

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: benchmarks/ itself is sys.path[0]
    sys.path.insert(0, str(REPO))

from benchmarks.common import machine, utc_now, write_json  # noqa: E402

FLOOR_RATIO = 1.5


def _model(path: Path) -> torch.nn.Module:
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32).eval()
    return model


def _row(name: str, t: float, scores: Any, n_bins: int) -> dict[str, Any]:
    opts = scores.options
    conf = OptionTemperature(t).confidence(opts.logits, opts.prediction, opts.groups)
    y = scores.correct.astype(np.float64)
    out = {"fit": name, "temperature": t, "ece": ece(conf, y, n_bins),
           "nll": nll(conf, y), "brier": brier(conf, y), "auroc": auroc(conf, y),
           "mean_confidence": float(conf.mean()), "accuracy": float(y.mean()), "n": int(y.size)}
    if scores.expected is not None:
        out["expected_ece"] = ece(conf, scores.expected, n_bins)
    return out


def run(base_dir: Path, aligned_dir: Path, data: Path, n_bins: int = N_BINS,
        limit: int | None = None) -> dict[str, Any]:
    """The comparison for one pair; `limit`: the first N items of each split."""
    tok = AutoTokenizer.from_pretrained(aligned_dir)
    aligned, base = _model(aligned_dir), _model(base_dir)
    t0 = time.perf_counter()
    cal_items, _ = load_items(data / "calibrate.jsonl", limit)
    unlabelled, had_answers, _ = load_unlabelled(data / "calibrate.jsonl")
    unlabelled = unlabelled[:limit] if limit else unlabelled
    test_items, _ = load_items(data / "test.jsonl", limit)
    # Labelled: the aligned model's option logits with the gold options of the calibrate split.
    labelled = MCEvaluator(tok, cal_items).score(aligned).options
    assert labelled is not None
    t_gold = OptionTemperature().fit(labelled.logits, labelled.gold, labelled.groups).temperature
    # Label-free: the same prompts with the answers dropped, the base model as the reference.
    mine, ref = fit_split(MCEvaluator(tok, unlabelled), aligned, base)
    daca = fit_daca(mine.logits, ref.logits, mine.groups, base_groups=ref.groups)
    naive = fit_daca(mine.logits, ref.logits, mine.groups, base_groups=ref.groups,
                     agreement_only=False)
    views: dict[str, list[dict[str, Any]]] = {}
    select_items, _ = load_items(data / "select.jsonl", limit)
    # All held out from the fit; the floor is on test, the others show the split-to-split spread.
    for split, items in (("test", test_items), ("select", select_items),
                         ("select+test", [*select_items, *test_items])):
        held = MCEvaluator(tok, items).score(aligned)
        views[split] = [
            _row("raw (T = 1)", 1.0, held, n_bins),
            _row("labelled option temperature", t_gold, held, n_bins),
            _row("DACA, label-free (agreeing items)", daca.temperature, held, n_bins),
            _row("label-free, every item (no agreement filter)", naive.temperature, held,
                 n_bins),
            # The reference's own answers and confidence: what DACA takes to be calibrated.
            {**_row("base model itself (the reference)", 1.0,
                    MCEvaluator(tok, items).score(base), n_bins), "temperature": None},
        ]
    rows = views["test"]
    raw_ece, gold_ece, daca_ece = rows[0]["ece"], rows[1]["ece"], rows[2]["ece"]
    floor = daca_ece <= FLOOR_RATIO * gold_ece and daca_ece < raw_ece
    ratios = {split: v[2]["ece"] / v[1]["ece"] for split, v in views.items()}
    return {
        "pair": {"base": str(base_dir), "aligned": str(aligned_dir), "data": str(data)},
        "calibrate_items": len(unlabelled), "test_items": len(test_items),
        "answers_dropped": had_answers,
        "agreement": daca.agreement, "n_agree": daca.n_agree,
        "rows": rows, "views": views,
        "ratio_daca_to_labelled": ratios["test"], "ratios": ratios,
        "floor": {"rule": f"DACA ECE <= {FLOOR_RATIO} x labelled and < raw", "met": floor},
        "seconds": time.perf_counter() - t0,
        "machine": f"{machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "date": utc_now(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", type=Path, default=None,
                    help="a built demo world (default: build or reuse the cached one)")
    ap.add_argument("--base", type=Path, default=None, help="another pair's base checkpoint")
    ap.add_argument("--aligned", type=Path, default=None, help="its aligned checkpoint")
    ap.add_argument("--data", type=Path, default=None,
                    help="its data (calibrate.jsonl, select.jsonl, test.jsonl)")
    ap.add_argument("--limit", type=int, default=None, help="the first N items of each split")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    args = ap.parse_args(argv)
    pair = (args.base, args.aligned, args.data)
    if any(x is not None for x in pair):
        if any(x is None for x in pair) or args.demo_dir is not None:
            ap.error("argument --base/--aligned/--data: give all three, without --demo-dir")
        base_dir, aligned_dir, data = pair
    else:
        demo_dir = args.demo_dir
        if demo_dir is None:
            from calibserve.demo import build_world

            demo_dir = build_world()
        base_dir, aligned_dir, data = demo_dir / "base", demo_dir / "aligned", demo_dir / "data"
    if args.limit is not None and args.limit < 1:
        ap.error("argument --limit: must be at least 1")
    result = run(base_dir, aligned_dir, data, limit=args.limit)
    print(f"pair {aligned_dir} / {base_dir}: {result['calibrate_items']} calibrate prompts "
          f"(answers dropped for DACA: {result['answers_dropped']}), agreement "
          f"{result['agreement']:.3f} ({result['n_agree']} items fitted on), "
          f"{result['test_items']} held-out test items")
    for split, rows in result["views"].items():
        print(f"\n{split} ({rows[0]['n']} items), DACA / labelled ECE "
              f"{result['ratios'][split]:.2f}:")
        print("| fit | T | held-out ECE | expected ECE | NLL | Brier | AUROC | accuracy | "
              "mean conf |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            t = "-" if r["temperature"] is None else f"{r['temperature']:.3f}"
            print(f"| {r['fit']} | {t} | {r['ece']:.4f} | "
                  f"{r.get('expected_ece', float('nan')):.4f} | {r['nll']:.4f} | "
                  f"{r['brier']:.4f} | {r['auroc']:.4f} | {r['accuracy']:.3f} | "
                  f"{r['mean_confidence']:.3f} |")
    print(f"\ntest: DACA / labelled ECE = {result['ratio_daca_to_labelled']:.2f}; floor "
          f"({result['floor']['rule']}): {'met' if result['floor']['met'] else 'MISSED'}")
    if args.json is not None:
        write_json(args.json, result)
    return 0 if result["floor"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())

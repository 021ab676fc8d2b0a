"""Escalation benchmark: accuracy of calibserve's final answers vs. the escalation rate.

    [CALIBSERVE_DEMO_DIR=D] [CALIBSERVE_MERGED_DIR=M] python -m benchmarks.escalation.run

One pass per primary over the demo `test` split, through calibserve (the server's HTTP app when
importable, else routing.Router; the output says which), records (primary answer, confidence,
expert answer, gold) per item; sweep.py then evaluates every escalation rate 0..100% offline
(escalating the k least confident items is what the threshold between the k-th and (k+1)-th
confidence does). Curves: (a) merged model + calibrated confidence, (b) aligned model + raw
confidence, (c) random escalation (of the merged model), plus the oracle as a bound. A live
check then runs the real escalation route at the 20% threshold and compares it with the sweep.
At most two vLLM servers run at a time (expert + one primary).

The per-item records are an intermediate: `--raw` (default
`$CALIBSERVE_HOME/benchmarks/escalation/results.json`, not committed; `--report-only` re-renders
from it). What is committed beside this script: `summary.json` (curves, summary lines, the
merged model's served ECE that benchmarks/freeform compares with) and `escalation.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # allow `python benchmarks/escalation/run.py`
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.common import machine, run_dir, utc_now, vllm_server, write_json  # noqa: E402
from benchmarks.escalation import report, sweep  # noqa: E402
from benchmarks.escalation.ask import (  # noqa: E402
    Answer,
    TierSpec,
    ask_all,
    asker_class,
)
from calibserve.calibration import CalibrationDocument  # noqa: E402

HERE = Path(__file__).resolve().parent
RATES = [i / 20 for i in range(21)]
NAMES = ("merged + calibrated", "aligned + raw", "random (merged)", "oracle (merged)")
# Issue 29's demo floors: the expert's lead over the merged model alone, and the calibrated
# route's lead over random escalation at 20% (both in points).
FLOOR_EXPERT_LEAD = 8.0
FLOOR_ROUTE_GAIN = 3.0


def locate(args: argparse.Namespace) -> tuple[Path, Path]:
    demo = os.environ.get("CALIBSERVE_DEMO_DIR")
    if demo:
        demo_dir = Path(demo)
    else:
        from calibserve.demo import build_world

        demo_dir = build_world()
    merged_env = os.environ.get("CALIBSERVE_MERGED_DIR")
    if merged_env:
        merged = Path(merged_env)
    else:
        from calibserve.demo_pipeline import merge_demo

        merged = merge_demo(demo_dir)
    model = merged / "model" if (merged / "model").is_dir() else merged
    if not (model / "calibration.json").is_file():
        raise SystemExit(f"{model} has no calibration.json: the benchmark needs the merged model")
    return demo_dir, model


def load_items(demo_dir: Path, limit: int | None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (demo_dir / "data" / "test.jsonl").open() if line.strip()]
    items = [r for r in rows if isinstance(r.get("choices"), list)]
    return items[:limit] if limit else items


async def one_pass(cls: Any, primary: TierSpec, items: list[dict[str, Any]],
                   concurrency: int, expert: TierSpec | None = None,
                   threshold: float | None = None) -> list[Answer]:
    async with cls(primary, expert, threshold) as asker:
        return await ask_all(asker, items, concurrency)


def ece_of(conf: list[float], correct: list[bool]) -> float:
    from calibserve.calibration import ece

    return float(ece(np.asarray(conf), np.asarray(correct, dtype=float)))


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Run the passes (vLLM servers, calibserve) and return the raw per-item records."""
    demo_dir, merged_model = locate(args)
    items = load_items(demo_dir, args.limit)
    cls = asker_class(prefer_server=not args.router)
    cal_path = merged_model / "calibration.json"
    cal = CalibrationDocument.load(cal_path)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="esc-bench-") as tmp:
        tmpdir = Path(tmp)
        # Raw confidence for the aligned model: the merged model's confidence method, no calibrator.
        raw_cal = tmpdir / "raw-calibration.json"
        bare = {"calibrator": None, "thresholds": [], "fit": None}
        uncalibrated = {name: m.model_copy(update=bare) for name, m in cal.methods.items()}
        cal.model_copy(update={"methods": uncalibrated}).write(raw_cal)
        with vllm_server(demo_dir / "expert", "expert", tmpdir) as expert_url:
            expert = TierSpec("expert", expert_url, None)
            with vllm_server(merged_model, "merged", tmpdir) as merged_url:
                merged = TierSpec("merged", merged_url, cal_path)
                merged_ans = asyncio.run(one_pass(cls, merged, items, args.concurrency))
                expert_ans = asyncio.run(one_pass(cls, expert, items, args.concurrency))
                t20 = sweep.threshold_for_rate([a.score for a in merged_ans], 0.2)
                live = asyncio.run(one_pass(cls, merged, items, args.concurrency, expert, t20))
            with vllm_server(demo_dir / "aligned", "aligned", tmpdir) as aligned_url:
                aligned = TierSpec("aligned", aligned_url, raw_cal)
                aligned_ans = asyncio.run(one_pass(cls, aligned, items, args.concurrency))
    manifest = demo_dir / "manifest.json"
    digest = json.loads(manifest.read_text()).get("digest") if manifest.is_file() else None
    return {
        "via": cls.via, "demo_dir": str(demo_dir), "demo_digest": digest,
        "merged_model": str(merged_model), "calibration": cal.to_dict(), "threshold_20": t20,
        "machine": machine(),
        # Items about entities only the expert read about (demo world version 8 on).
        "long_tail": [bool(it.get("long_tail")) for it in items],
        "wall_seconds": time.perf_counter() - started,
        "date": utc_now(),
        "items": {"merged": [a.to_dict() for a in merged_ans],
                  "aligned": [a.to_dict() for a in aligned_ans],
                  "expert": [a.to_dict() for a in expert_ans],
                  "live_20": [a.to_dict() for a in live]},
    }


def _long_tail_lines(tail: list[bool] | None, run_m: sweep.Pass, run_a: sweep.Pass,
                     expert_ok: list[bool]) -> dict[str, str]:
    """Accuracy on the long-tail items and on the rest, and how many of the merged model's 20%
    least confident answers are long-tail ones (absent for worlds without a long tail)."""
    if not tail or not any(tail):
        return {}
    mask = np.asarray(tail, dtype=bool)
    expert = np.asarray(expert_ok, dtype=bool)

    def acc(ok: np.ndarray) -> str:
        return f"{100 * ok[mask].mean():.1f}% / {100 * ok[~mask].mean():.1f}%"

    k = round(0.2 * run_m.n)
    low = np.argsort(run_m.confidence, kind="stable")[:k]
    return {
        "long-tail items (only the expert read about them)": f"{int(mask.sum())} of {mask.size}",
        "accuracy on long tail / rest (merged)": acc(run_m.primary_correct),
        "accuracy on long tail / rest (aligned)": acc(run_a.primary_correct),
        "accuracy on long tail / rest (expert)": acc(expert),
        "merged's 20% least confident answers that are long-tail items": (
            f"{int(mask[low].sum())} of {k} (ties in stable order)"),
    }


# What summary.json keeps of the raw records (the rest is per item).
RUN_KEYS = ("via", "demo_dir", "demo_digest", "merged_model", "threshold_20", "machine",
            "wall_seconds", "date")


def render(raw: dict[str, Any], out: Path, results_md: Path) -> str:
    """Curves, plot, summary.json and the RESULTS.md section from the per-item records."""
    recs = raw["items"]
    merged_ans, aligned_ans = recs["merged"], recs["aligned"]
    expert_ok = [a["correct"] for a in recs["expert"]]
    live = recs["live_20"]
    cal = raw["calibration"]  # the merged model's calibration.json (version 2)
    mc = cal.get("multiple_choice", "answer")
    mc_entry = (cal.get("methods") or {}).get(mc) or {}
    run_m = sweep.Pass.of([a["score"] for a in merged_ans], [a["correct"] for a in merged_ans],
                          expert_ok)
    run_a = sweep.Pass.of([a["score"] for a in aligned_ans], [a["correct"] for a in aligned_ans],
                          expert_ok)
    curves = {
        NAMES[0]: sweep.curve(run_m, RATES),
        NAMES[1]: sweep.curve(run_a, RATES),
        NAMES[2]: sweep.curve(run_m, RATES, "random"),
        NAMES[3]: sweep.curve(run_m, RATES, "oracle"),
    }
    i20 = RATES.index(0.2)
    at20 = {n: curves[n][i20] for n in NAMES}
    lam = (cal.get("merge") or {}).get("lambda")
    lead = 100 * (float(np.mean(expert_ok)) - float(np.mean(run_m.primary_correct)))
    gain20 = 100 * (at20[NAMES[0]] - at20[NAMES[2]])
    summary = {
        "items": run_m.n,
        "via": raw["via"],
        "demo world": f"{raw['demo_dir']} (digest {raw['demo_digest']})",
        "merged model": f"{raw['merged_model']} (lambda {lam})",
        "merged confidence": f"{mc} + {(mc_entry.get('calibrator') or {}).get('type', 'identity')}"
                             " calibrator",
        "accuracy alone (merged / aligned / expert)": " / ".join(
            f"{100 * np.mean(x):.1f}%" for x in
            (run_m.primary_correct, run_a.primary_correct, expert_ok)),
        "ECE (merged calibrated / merged raw / aligned raw)": " / ".join(f"{e:.3f}" for e in (
            ece_of([a["score"] for a in merged_ans], run_m.primary_correct.tolist()),
            ece_of([a["raw"] for a in merged_ans], run_m.primary_correct.tolist()),
            ece_of([a["score"] for a in aligned_ans], run_a.primary_correct.tolist()))),
        "at 20% escalation: calibrated - random": f"{100 * (at20[NAMES[0]] - at20[NAMES[2]]):+.1f}"
                                                  " points",
        "at 20% escalation: calibrated - aligned raw":
            f"{100 * (at20[NAMES[0]] - at20[NAMES[1]]):+.1f} points",
        "at 20% escalation: aligned raw - random escalation of the aligned model": (
            f"{100 * (at20[NAMES[1]] - sweep.accuracy_random(run_a, round(0.2 * run_a.n))):+.1f}"
            " points"),
        "expert - merged alone": f"{lead:+.1f} points (floor {FLOOR_EXPERT_LEAD:+.0f}: "
                                 f"{'met' if lead >= FLOOR_EXPERT_LEAD else 'NOT met'})",
        "calibrated - random at 20%": f"{gain20:+.1f} points (floor {FLOOR_ROUTE_GAIN:+.0f}: "
                                      f"{'met' if gain20 >= FLOOR_ROUTE_GAIN else 'NOT met'})",
        **_long_tail_lines(raw.get("long_tail"), run_m, run_a, expert_ok),
        "live route at the 20% threshold": (
            f"threshold {raw['threshold_20']:.4f}: escalated "
            f"{100 * np.mean([a['escalated'] for a in live]):.1f}%, accuracy "
            f"{100 * np.mean([a['correct'] for a in live]):.1f}% "
            f"(sweep predicts {100 * at20[NAMES[0]]:.1f}%)"),
        "run": f"{raw['date']}, {raw['wall_seconds']:.0f} s wall (3 vLLM starts included), "
               f"{raw.get('machine', 'CPU not recorded')}",
    }
    notes = []
    if lam is not None and float(lam) == 1.0:
        notes.append("The merge selected lambda 1.0, so the merged model *is* the aligned model: "
                     "(a) and (b) differ only by the calibrator, which is monotone and therefore "
                     "escalates exactly the same items; the curves coincide.")
    gap0 = 100 * (curves[NAMES[0]][0] - curves[NAMES[1]][0])
    gap20 = 100 * (at20[NAMES[0]] - at20[NAMES[1]])
    if gap0 * gap20 < 0:
        trend = ("Escalation reverses the order: the primary that starts behind has more errors "
                 "for the expert to fix")
    elif abs(gap20) < abs(gap0):
        trend = ("Escalation narrows the gap because the weaker primary has more errors for the "
                 "expert to fix")
    else:
        trend = "Escalation does not narrow the gap"
    side = "level with" if gap0 == 0 else "ahead of" if gap0 > 0 else "behind"
    notes.append(
        f"Reading the lead over (b): with no escalation the merged model is "
        f"{abs(gap0):.1f} points {side} the aligned one; at 20% its lead is {gap20:+.1f}. "
        f"{trend}; per escalated item, compare each curve with random escalation of its own "
        "primary (lines above).")
    behind = [f"{100 * r:.0f}%" for r, a, b in zip(RATES, curves[NAMES[0]], curves[NAMES[1]],
                                                     strict=True) if b >= a and 0 < r < 1]
    if behind:
        notes.append("(b) is level with or ahead of (a) at " + ", ".join(behind) + " escalation: "
                     "the more is escalated, the more answers come from the same expert, so "
                     "the routes converge (both reach the expert's accuracy at 100%).")
    if at20[NAMES[0]] <= at20[NAMES[2]]:
        notes.append("At 20% the calibrated route does NOT beat random escalation on this world.")
    out.mkdir(parents=True, exist_ok=True)
    png = out / "escalation.png"
    report.plot(png, RATES, curves, float(np.mean(expert_ok)),
                f"demo test split, n={run_m.n}: accuracy vs escalation rate")
    merged_ece = ece_of([a["score"] for a in merged_ans], run_m.primary_correct.tolist())
    write_json(out / "summary.json", {
        **{k: raw.get(k) for k in RUN_KEYS}, "items": run_m.n, "merged_served_ece": merged_ece,
        "rates": RATES, "curves": curves, "summary": summary}, indent=1)
    rel_png = os.path.relpath(png, results_md.parent)
    body = (
        "Escalation benchmark (`python -m benchmarks.escalation.run`, issue 6): accuracy of the\n"
        "final answers against the escalation rate on the demo `test` split. One pass per\n"
        "primary through calibserve records (primary answer, confidence, expert answer, gold)\n"
        "per item; every rate is then evaluated offline by escalating the k least confident\n"
        "items (what a threshold between the k-th and (k+1)-th confidence does; ties broken at\n"
        "random, in expectation). Random escalation is its exact expectation; the oracle\n"
        "escalates exactly the items the expert fixes. A live run of the real escalation route\n"
        "at the 20% threshold checks the offline sweep. Curves and summary:\n"
        "`benchmarks/escalation/summary.json`; per-item records (not committed):\n"
        "`$CALIBSERVE_HOME/benchmarks/escalation/results.json` (re-render with\n"
        "`--report-only`).\n\n"
        + report.summary_lines(summary)
        + ("\n\n" + "\n".join(f"- Note: {n}" for n in notes) if notes else "")
        + "\n\n" + report.table(RATES, curves)
        + f"\n\n![accuracy vs escalation rate]({rel_png})\n"
    )
    report.write_section(results_md, body)
    return body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first N test items only")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--router", action="store_true", help="use routing.Router, not the server")
    ap.add_argument("--out", type=Path, default=HERE, help="summary.json and escalation.png")
    ap.add_argument("--raw", type=Path, default=None,
                    help="the per-item records (default "
                    "$CALIBSERVE_HOME/benchmarks/escalation/results.json)")
    ap.add_argument("--results-md", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render from RAW without running anything")
    args = ap.parse_args(argv)
    raw_path = args.raw or run_dir("escalation") / "results.json"
    if args.report_only:
        raw = json.loads(raw_path.read_text())
    else:
        raw = collect(args)
        print(f"per-item records: {write_json(raw_path, raw, indent=1)}")
    print(render(raw, args.out, args.results_md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

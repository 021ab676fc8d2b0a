"""The vLLM evaluator against the transformers reference, and against what is served (issue 28).

    .venv/bin/python -m benchmarks.vllm_evaluator [--pair demo|gemma] [--max-items N]
        [--grid 0:1:0.1] [--skip-served] [--json benchmarks/results/vllm_evaluator-PAIR.json]

1. agreement: `calibserve merge` on the pair with `--evaluator transformers` and with
   `--evaluator vllm` (same grid, float32, no refinement, no free-form fit after the write);
   every point's multiple-choice and short-answer accuracy (exactly) and ECE (within 0.01),
   the selected lambda, and each run's sweep wall time.
2. served: the vLLM run's checkpoint under `calibserve serve` (managed engine, the checkpoint's
   own calibration.json), the held-out (test) items asked through the openai SDK as one user
   message (multiple choice: `format_mc_prompt`, one token; short answers: the question, the
   sweep's `max_new_tokens`, temperature 0); each reply's `confidence.raw` against the raw
   confidence the sweep recorded for that item at the selected lambda (floor: within 1e-3).

Pairs: `demo` (the demo world, built if missing) and `gemma` (.calibserve/realworld: Gemma 3
270M base and instruct, world facts; local directories, no hub). Work under
.calibserve/bench/vllm_evaluator/; merges already complete there are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: benchmarks/ itself is sys.path[0]
    sys.path.insert(0, str(REPO))

from benchmarks.common import loadavg, machine, utc_now, write_json  # noqa: E402

WORK = REPO / ".calibserve" / "bench" / "vllm_evaluator"
REAL = REPO / ".calibserve" / "realworld"


def _pair(name: str) -> tuple[Path, Path, Path]:
    if name == "gemma":
        models = REAL / "models"
        return (models / "gemma-3-270m", models / "gemma-3-270m-instruct",
                REAL / "data" / "world_facts")
    from calibserve.demo import build_world

    world = Path(build_world())
    return world / "base", world / "aligned", world / "data"


def merge(pair: str, evaluator: str, args: argparse.Namespace) -> tuple[Path, float]:
    """One `calibserve merge` run (reused when complete); its OUT and wall seconds."""
    base, aligned, data = _pair(pair)
    tag = f"{args.max_items}-{args.grid.replace(':', '_')}-{args.dtype}-{args.device}" + (
        f"-tp{args.tp}" if evaluator == "vllm" and args.tp != 1 else "")
    out = WORK / f"{pair}-{evaluator}-{tag}-{args.select.replace(':', '_')}"
    if (out / "report.json").is_file():
        return out, float(json.loads((out / "timing.json").read_text())["wall_s"])
    cmd = [sys.executable, "-m", "calibserve", "merge", "--base", str(base), "--aligned",
           str(aligned), "--data", str(data), "--out", str(out), "--grid", args.grid,
           "--no-refine", "--calibrator", "temperature", "--no-free-form", "--quiet",
           "--dtype", args.dtype, "--evaluator", evaluator, "--select", args.select,
           "--device", args.device, "--grader", args.grader,
           *(["--tensor-parallel-size", str(args.tp)] if evaluator == "vllm" else []),
           *(["--max-items", str(args.max_items)] if args.max_items else []),
           *args.extra]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"merge ({evaluator}) failed:\n{done.stderr[-4000:]}")
    (out / "timing.json").write_text(json.dumps({"wall_s": wall}))
    return out, wall


def agreement(ref: Path, eng: Path) -> dict[str, Any]:
    """Per-point differences between the two reports."""
    a = json.loads((ref / "report.json").read_text())
    b = json.loads((eng / "report.json").read_text())
    rows = []
    for p, q in zip(a["points"], b["points"], strict=True):
        row = {"lambda": p["lambda"], "accuracy": [p["accuracy"], q["accuracy"]],
               "ece_diff": abs(p["ece"] - q["ece"]), "seconds": [p["seconds"], q["seconds"]]}
        if p.get("free_form") and q.get("free_form"):
            row["free_form_accuracy"] = [p["free_form"]["accuracy"], q["free_form"]["accuracy"]]
            row["free_form_ece_diff"] = abs(p["free_form"]["ece"] - q["free_form"]["ece"])
        rows.append(row)
    return {
        "points": rows,
        "accuracy_equal_everywhere": all(r["accuracy"][0] == r["accuracy"][1] for r in rows),
        "free_form_accuracy_equal_everywhere": all(
            r["free_form_accuracy"][0] == r["free_form_accuracy"][1]
            for r in rows if "free_form_accuracy" in r),
        "max_ece_diff": max(r["ece_diff"] for r in rows),
        "max_free_form_ece_diff": max(r.get("free_form_ece_diff", 0.0) for r in rows),
        "selected": [a["selected"]["lambda"], b["selected"]["lambda"]],
        "sweep_s": [a["timings"]["sweep_s"], b["timings"]["sweep_s"]],
        "load_s": [a["timings"]["load_s"], b["timings"]["load_s"]],
    }


def _recorded(out: Path, lam: float) -> dict[str, Any]:
    found = sorted((out / "sweep").glob(f"*/test-lambda{lam:+.6f}.json"))
    if len(found) != 1:
        raise SystemExit(f"expected one cached test point at lambda {lam} in {out}/sweep")
    return dict(json.loads(found[0].read_text()))


def served(out: Path, pair: str, max_items: int | None) -> dict[str, Any]:
    """The held-out items through `calibserve serve` and the openai SDK, against the sweep."""
    from benchmarks.realworld.served import calibserve_serve, drive
    from calibserve.calibration.mc_prompt import format_mc_prompt
    from calibserve.merge.evaluate import load_items, short_answer_split

    report = json.loads((out / "report.json").read_text())
    lam = float(report["selected"]["lambda"])
    point = _recorded(out, lam)
    data = Path(report["config"]["data"])
    mc_items, _ = load_items(data / "test.jsonl", max_items)
    # Short answers only where the sweep scored them (not with --no-short-answers).
    short = short_answer_split(data, "test")[:max_items] if point.get("free_form") else []
    work = out.parent / f"{out.name}-served"
    work.mkdir(parents=True, exist_ok=True)
    max_new = int(report["config"]["max_new_tokens"])
    model = out / "model"
    cfg = json.loads((model / "config.json").read_text())
    longest = int(cfg.get("text_config", cfg).get("max_position_embeddings", 512))
    with calibserve_serve(model, "merged", model / "calibration.json", work,
                          max_model_len=min(512, longest)) as url:
        mc_out, ff_out = work / "mc.jsonl", work / "free_form.jsonl"
        drive(url, "merged", {i: format_mc_prompt(it) for i, it in enumerate(mc_items)},
              mc_out, max_tokens=1, desc="multiple choice")
        if short:
            drive(url, "merged", {i: str(it["question"]) for i, it in enumerate(short)},
                  ff_out, max_tokens=max_new, desc="short answers")

    def compare(path: Path, recorded: list[float], kind: str) -> dict[str, Any]:
        got = {int(r["i"]): r for r in map(json.loads, path.read_text().splitlines())}
        diffs = [abs(float(got[i]["confidence"]["raw"]) - recorded[i]) for i in sorted(got)]
        methods = sorted({str(r["confidence"]["method"]) for r in got.values()})
        return {"kind": kind, "n": len(diffs), "max_abs_diff": max(diffs),
                "within_1e-3": sum(d <= 1e-3 for d in diffs), "methods": methods}

    rows = [compare(work / "mc.jsonl", point["scores"]["confidence"], "multiple choice")]
    if short:
        rows.append(compare(work / "free_form.jsonl",
                            point["free_form"]["scores"]["confidence"], "short answer"))
    return {"lambda": lam, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", choices=("demo", "gemma"), default="demo")
    ap.add_argument("--grid", default="0:1:0.1")
    ap.add_argument("--max-items", type=int, default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--select", default="max-accuracy")
    ap.add_argument("--grader", default="exact")
    ap.add_argument("--tp", type=int, default=1, help="The vLLM run's tensor-parallel size.")
    ap.add_argument("--device", default=None, help="Default: cuda when torch sees a GPU.")
    ap.add_argument("--skip-served", action="store_true")
    ap.add_argument("--only", choices=("transformers", "vllm"), default=None,
                    help="Run one evaluator only (timing).")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("extra", nargs="*", help="More `calibserve merge` arguments (after --).")
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    WORK.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "pair": args.pair, "grid": args.grid, "max_items": args.max_items, "dtype": args.dtype,
        "device": args.device, "select": args.select, "grader": args.grader, "tp": args.tp,
        "machine": machine(), "date": utc_now(), "load_average_at_start": loadavg()[0],
    }
    runs: dict[str, Path] = {}
    for evaluator in ("transformers", "vllm"):
        if args.only not in (None, evaluator):
            continue
        out, wall = merge(args.pair, evaluator, args)
        runs[evaluator] = out
        result[f"{evaluator}_wall_s"] = round(wall, 1)
        print(f"{evaluator}: {out} ({wall:.0f} s)", flush=True)
    if len(runs) == 2:
        result["agreement"] = agreement(runs["transformers"], runs["vllm"])
        print(json.dumps({k: v for k, v in result["agreement"].items() if k != "points"}))
    if not args.skip_served and "vllm" in runs:
        result["served"] = served(runs["vllm"], args.pair, args.max_items)
        print(json.dumps(result["served"]))
    if args.json is not None:
        write_json(args.json, result, indent=1)


if __name__ == "__main__":
    main()

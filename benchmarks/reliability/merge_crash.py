"""Crash safety of `calibserve merge`: SIGKILL at chosen points, then rerun the same command.

Kill points (made exact by benchmarks/reliability/merge_hooks.py, which pauses the merge there):
`sweep` (after 2 of the grid's points are cached), `write` (after the first tensor of the model
is written), `rename` (just before the staging directory becomes OUT), plus `timed` kills at
random moments with no hook at all. After each kill:

- OUT must not look complete unless it is: it must not exist, or (a timed kill that landed after
  the final rename) be complete, and then the rerun must refuse to overwrite it;
- the rerun of the same command must finish and produce a complete OUT;
- the rerun must resume: the sweep points cached before the kill are read back, not recomputed.

Tiny random Llama checkpoints and a tiny MC data set are built in a temporary directory (the
same builder the merge tests use), so each merge takes seconds.

    python -m benchmarks.reliability.merge_crash [--timed 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.reliability.harness import REPO, python, write_result

GRID = "0:1:0.25"  # 5 points: enough to kill in the middle of the sweep


def build_world(root: Path) -> dict[str, Path]:
    """A tiny related base/aligned pair and MC data (calibserve.testing.checkpoints)."""
    from calibserve.testing.checkpoints import make_pair, write_data

    base, aligned = make_pair(root, seed=0)
    return {"base": base, "aligned": aligned, "data": write_data(root, n=24)}


def merge_args(world: dict[str, Path], out: Path) -> list[str]:
    return ["merge", "--base", str(world["base"]), "--aligned", str(world["aligned"]),
            "--data", str(world["data"]), "--out", str(out), "--grid", GRID, "--no-refine",
            "--quiet", "--batch-size", "8", "--evaluator", "transformers"]


def _events(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _launch(args: list[str], log: Path, pause: str | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["RELIABILITY_MERGE_LOG"] = str(log)
    env.pop("RELIABILITY_MERGE_PAUSE", None)
    if pause:
        env["RELIABILITY_MERGE_PAUSE"] = pause
    env.setdefault("OMP_NUM_THREADS", "1")  # a shared 2-core machine
    return subprocess.Popen([python(), "-m", "benchmarks.reliability.merge_hooks", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def looks_complete(out: Path) -> bool:
    return (out / "model" / "calibration.json").is_file() or (out / "report.json").is_file()


def complete(out: Path) -> bool:
    model = out / "model"
    return (model / "config.json").is_file() and (model / "calibration.json").is_file() and any(
        model.glob("*.safetensors")) and (out / "report.json").is_file()


def kill_at(world: dict[str, Path], work: Path, point: str, timed_s: float | None = None
            ) -> dict[str, Any]:
    """Kill one merge at `point` (a hook) or after `timed_s` seconds; rerun; check."""
    out = work / f"out-{point}"
    log = work / f"{point}.log"
    args = merge_args(world, out)
    pause = {"sweep": "sweep:2", "write": "write", "rename": "rename"}.get(point)
    proc = _launch(args, log, pause)
    deadline = time.monotonic() + 300
    killed_at_phase = None
    while time.monotonic() < deadline and proc.poll() is None:
        if pause and any("paused" in e for e in _events(log)):
            killed_at_phase = point
            break
        if timed_s is not None and time.monotonic() - (deadline - 300) >= timed_s:
            killed_at_phase = f"timed {timed_s:.1f}s"
            break
        time.sleep(0.02)
    finished_before_kill = proc.poll() is not None
    if not finished_before_kill:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cached_before = sum(1 for e in _events(log) if e.get("event") == "computed")
    staging = out.parent / f".{out.name}.partial"
    after_kill = {
        "out_exists": out.exists(),
        "out_looks_complete": looks_complete(out),
        "out_complete": complete(out),
        "staging_exists": staging.exists(),
        "staging_model_tmp": (staging / "model.tmp").exists(),
        "staging_model": (staging / "model").exists(),
        "cached_points": cached_before,
    }
    # Rerun the same command, without any hook.
    rerun_log = work / f"{point}.rerun.log"
    t0 = time.monotonic()
    rerun = _launch(args, rerun_log, None)
    output, _ = rerun.communicate(timeout=600)
    events = _events(rerun_log)
    result = {
        "point": point,
        "killed": not finished_before_kill,
        "killed_at": killed_at_phase,
        "after_kill": after_kill,
        "rerun_exit": rerun.returncode,
        "rerun_s": round(time.monotonic() - t0, 1),
        "rerun_cache_hits": sum(1 for e in events if e.get("event") == "cache_hit"),
        "rerun_computed": sum(1 for e in events if e.get("event") == "computed"),
        "rerun_complete": complete(out),
        "staging_left": staging.exists(),
    }
    result["rerun_output_tail"] = output.decode(errors="replace")[-300:]
    return result


def verdict(r: dict[str, Any]) -> bool:
    """OUT is absent or complete after the kill, never partial; the rerun finishes from the cache.

    A timed kill can land after the final rename (the merge was done, only exiting): then OUT is
    complete and a rerun of the same command must refuse to overwrite it (exit 2), not redo it.
    """
    a = r["after_kill"]
    if a["out_exists"]:
        return a["out_complete"] and r["rerun_exit"] == 2 and r["rerun_complete"]
    resumed = r["rerun_cache_hits"] >= a["cached_points"] if a["cached_points"] else True
    return (not a["out_looks_complete"] and r["rerun_exit"] == 0 and r["rerun_complete"]
            and not r["staging_left"] and resumed)


def run(points: list[str], timed: int, seed: int = 0, root: Path | None = None
        ) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="merge-crash-", dir=root) as tmp:
        work = Path(tmp)
        world = build_world(work / "world")
        results = [kill_at(world, work, p) for p in points]
        for i in range(timed):
            results.append(kill_at(world, work, f"timed{i}", timed_s=rng.uniform(1.5, 7.0)))
    for r in results:
        r["ok"] = verdict(r)
    return results


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timed", type=int, default=3, help="extra kills at random times")
    parser.add_argument("--quick", action="store_true", help="the three hooked kills only")
    args = parser.parse_args(argv)
    console = Console(width=140)
    with console.status("killing and rerunning calibserve merge"):
        results = run(["sweep", "write", "rename"], 0 if args.quick else args.timed)
    for r in results:
        console.print(f"{'[green]ok[/]' if r['ok'] else '[red]FAIL[/]'} {r}")
    write_result("merge_crash", {"grid": GRID, "results": results})
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The whole merge, in order: validate, load, sweep, select, calibrate, write, report, publish.

`run_merge` is the entry point (the `calibserve merge` command, the tests, the benchmarks). Each
step's details live in its own module: merge/prepare.py (every check, before a byte is written),
merge/staging.py (the `.{OUT}.partial` staging directory, its lock, the rename to OUT),
merge/session.py (the loaded parents, evaluators and sweep caches), merge/progress.py (the
console), merge/card.py (the model card), merge/report_data.py (report.json's content). A killed
run leaves OUT absent and resumes from its staging directory when the same command is rerun.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from calibserve.calibration.certified import NOT_CERTIFIED, GuaranteeTargets
from calibserve.calibration.document import PROBES_FILE
from calibserve.merge.calibrate import calibration_json, fit_calibration, fit_label_free
from calibserve.merge.card import model_card
from calibserve.merge.config import MergeConfig
from calibserve.merge.errors import InvalidConfig, InvalidData
from calibserve.merge.evaluate import point_metrics
from calibserve.merge.prepare import Prepared, check_out, prepare
from calibserve.merge.progress import closing_table, sweep_progress, write_progress
from calibserve.merge.report import (
    plot_metrics,
    plot_plane,
    plot_reliability,
    write_html,
    write_json,
)
from calibserve.merge.report_data import report_data
from calibserve.merge.select import Selection, choose
from calibserve.merge.session import Evaluate, Session, load_session
from calibserve.merge.staging import publish, running, staging_dir
from calibserve.merge.sweep import Point, refine_lambdas
from calibserve.merge.sweep import run_sweep as sweep_points
from calibserve.merge.writer import write_model

__all__ = ["AfterWrite", "run_merge", "staging_dir", "Prepared", "prepare"]


# A step run on the written (still staged) checkpoint before OUT is published: given the model
# directory and the data directory, it rewrites the model's calibration.json (the free-form fit
# through the serving path, which merge cannot import: calibserve.fit provides it).
AfterWrite = Callable[[Path, Path], None]


def run_merge(config: MergeConfig, progress: bool = True,
              after_write: AfterWrite | None = None, notes: Sequence[str] = ()) -> Path:
    """Run the whole merge for `config` and return OUT (see the module docstring).

    `after_write` runs on the staged `model/` before the rename to OUT, so a failed or killed
    step leaves OUT absent, as a killed merge does. `notes` go into the report's notes."""
    console = Console(stderr=True, quiet=not progress)
    t_start = time.perf_counter()
    p = prepare(config)
    p.notes.extend(notes)
    out = p.out
    work = staging_dir(out)
    with running(work):
        check_out(out, config.overwrite)  # another run may have finished meanwhile
        _run(p, work, console, progress)
        if after_write is not None:
            with console.status("fitting the free-form methods through the serving path") \
                    if progress else contextlib.nullcontext():
                after_write(work / "model", config.data.expanduser())
        publish(work, out, config.overwrite)
    console.print(
        f"[green]merged model written to {out / 'model'}[/] ({time.perf_counter() - t_start:.1f} s)"
    )
    return out


def _sweep(s: Session, console: Console, show: bool) -> tuple[list[Point], list[float]]:
    """The grid, then (optionally) one refinement round around the frontier."""
    c = s.prepared.config
    ff = s.prepared.short_items.get("select")
    with sweep_progress(console, show) as prog:
        task = prog.add_task(f"sweeping {c.method} lambda", total=len(c.grid))
        # The short answers are most of a point's time: their generation has its own bar.
        gen = prog.add_task("short answers", total=len(ff), visible=False) if ff else None

        def start(lam: float) -> None:
            if gen is not None:
                prog.reset(gen, total=len(ff or ()), visible=True,
                           description=f"short answers at lambda={lam:g}")

        def batch(n: int) -> None:
            if gen is not None:
                prog.advance(gen, n)

        def evaluate() -> Evaluate:
            return s.evaluate("select", True, on_batch=batch, on_start=start)

        points = sweep_points(
            c.grid, evaluate(), s.caches["select"], "select",
            on_point=lambda _: prog.advance(task),
        )
        refined: list[float] = []
        if c.refine and len(points) >= 2:
            first = choose(points, c.select, c.tolerance, c.objective)
            refined = refine_lambdas(c.grid, [points[i].lam for i in first.frontier])
            if refined:
                task2 = prog.add_task("refining near the frontier", total=len(refined))
                points += sweep_points(
                    refined, evaluate(), s.caches["select"], "select",
                    on_point=lambda _: prog.advance(task2),
                )
                points.sort(key=lambda q: q.lam)
        if gen is not None:
            prog.update(gen, visible=False)
    return points, refined


def _write(
    p: Prepared,
    work: Path,
    sel: Selection,
    card: str,
    cal_json: dict[str, Any],
    console: Console,
    show: bool,
) -> None:
    """The model, into a fresh subdirectory each time: a killed write is simply redone."""
    model_tmp, model_dir = work / "model.tmp", work / "model"
    for d in (model_tmp, model_dir):
        if d.exists():
            shutil.rmtree(d)
    with write_progress(console, show) as prog:
        task = prog.add_task(f"writing lambda={sel.lam:g}", total=p.plan.total_bytes())
        write_model(
            p.plan,
            sel.lam,
            p.config.method,
            model_tmp,
            p.config.shard_size,
            card,
            on_bytes=lambda n: prog.advance(task, n),
            extra_json={"calibration.json": cal_json},
        )
    if "test" in p.items:  # the server's default probes: held out, never the fitted items
        (model_tmp / PROBES_FILE).write_text(
            "".join(json.dumps(item) + "\n" for item in p.items["test"]), encoding="utf-8")
    os.rename(model_tmp, model_dir)


def _run(p: Prepared, work: Path, console: Console, show: bool) -> dict[str, Any]:
    c = p.config
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    what = "starting the vLLM engine" if c.evaluator == "vllm" else "loading both parents"
    with console.status(what) if show else contextlib.nullcontext():
        s = load_session(p, work)
    timings["load_s"] = time.perf_counter() - t0
    try:
        return _run_loaded(p, s, work, console, show, timings)
    finally:
        s.close()  # the engine's processes end before anything else (the free-form fit) starts


def _run_loaded(p: Prepared, s: Session, work: Path, console: Console, show: bool,
                timings: dict[str, float]) -> dict[str, Any]:
    c = p.config
    t0 = time.perf_counter()
    points, refined = _sweep(s, console, show)
    computed = [q for q in points if not q.cached]
    timings["sweep_s"] = time.perf_counter() - t0
    timings["seconds_per_point"] = (
        sum(q.seconds for q in computed) / len(computed) if computed else float("nan")
    )
    sel = choose(points, c.select, c.tolerance, c.objective)
    chosen = points[sel.index]

    # The calibrator is fitted on its own split at the chosen lambda.
    cal_point = s.at("calibrate", sel.lam)
    if c.label_free:
        # No labels: the chosen point tempered towards the base (lambda 0) on the same prompts.
        mine, ref = cal_point.scores.options, s.at("calibrate", 0.0).scores.options
        if mine is None or ref is None:
            raise InvalidData("the calibrate split's option logits were not recorded",
                              "--label-free")
        cal = fit_label_free(mine, ref, c.n_bins, reference_name=p.plan.base.ref)
    else:
        cal = fit_calibration(cal_point.scores, c.calibrator, c.target_accuracy, c.n_bins,
                              guarantees=GuaranteeTargets(tuple(c.max_error), c.delta,
                                                          c.batch))
        uncertified = [n for n in cal.notes if n.startswith(NOT_CERTIFIED)]
        if uncertified:  # refused before anything is written
            raise InvalidConfig("the option-letter method at the chosen lambda: "
                                + "; ".join(uncertified), "--max-error")
    notes = [*p.notes, *cal.notes]

    # Held-out view: both parents and the chosen point, raw and through the calibrator.
    held_split = "test" if "test" in p.items else "calibrate"
    with console.status(f"held-out view ({held_split} split)") if show \
            else contextlib.nullcontext():
        held = {
            name: s.at(held_split, lam)
            for name, lam in (("base", 0.0), ("aligned", 1.0), ("selected", sel.lam))
        }
    sel_scores = held["selected"].scores
    held_cal = cal.serve(sel_scores)
    held_models = {name: dict(pt.metrics) for name, pt in held.items()}
    held_models["selected+calibrator"] = point_metrics(held_cal, c.n_bins)
    # Short answers held out: the raw free-form confidence (its map is fitted after the write).
    held_free_form = {name: pt.free_form_metrics for name, pt in held.items()
                      if pt.free_form_metrics is not None}

    extra: dict[str, Any] = {
        "select": {k: chosen.metrics[k] for k in ("accuracy", "ece", "brier", "nll", "n")}
    }
    if chosen.free_form_metrics is not None:
        extra["select_short_answer"] = {
            k: v for k, v in chosen.free_form_metrics.items()
            if k in ("accuracy", "ece", "brier", "nll", "auroc", "n") and math.isfinite(v)
        }
    if held_split == "test":
        extra["test"] = held_models["selected+calibrator"]  # what is served, held out
    merge_block = {
        "lambda": sel.lam,
        "method": c.method,
        "base": p.plan.base.ref,
        "aligned": p.plan.aligned.ref,
        "rule": c.selection,
    }
    cal_json = calibration_json(cal, _options(p), merge_block, extra).to_dict()

    t0 = time.perf_counter()
    _write(p, work, sel, model_card(p, sel, points, cal), cal_json, console, show)
    timings["write_s"] = time.perf_counter() - t0

    plots = work / "plots"
    plots.mkdir(exist_ok=True)
    plot_metrics(points, sel.lam, plots / "metrics_vs_lambda.png")
    plot_plane(points, sel.index, plots / "pareto_plane.png")
    plot_reliability(
        [
            ("base (lambda=0)", held["base"].scores.confidence, held["base"].scores.correct),
            (
                "aligned (lambda=1)",
                held["aligned"].scores.confidence,
                held["aligned"].scores.correct,
            ),
            (f"selected {sel.lam:g}, raw", sel_scores.confidence, sel_scores.correct),
            (f"selected {sel.lam:g}, {cal.family}", held_cal.confidence, held_cal.correct),
        ],
        c.n_bins,
        held_split,
        plots / "reliability.png",
    )
    report = report_data(
        p,
        points=points,
        refined=refined,
        sel=sel,
        cal=cal,
        held_split=held_split,
        held_models=held_models,
        held_free_form=held_free_form,
        notes=notes,
        timings=timings,
        plots=plots,
    )
    write_json(report, work / "report.json")
    write_html(report, plots, work / "report.html")
    closing_table(console, points, sel)
    return report


def _options(p: Prepared) -> tuple[str, ...]:
    from calibserve.merge.evaluate import LETTERS

    n = max(len(it["choices"]) for items in p.items.values() for it in items)
    return LETTERS[:n]


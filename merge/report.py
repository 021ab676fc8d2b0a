"""The merge report: `report.json`, plots under `plots/`, and a self-contained `report.html`.

Plots: accuracy and ECE against lambda (multiple choice, and the short answers' free-form
confidence when they were scored); the accuracy-ECE plane with the frontier and both parents
marked, the short answers' plane beside the multiple-choice one; reliability diagrams of
base, aligned and the selected point, before and after the calibrator. The HTML embeds the
PNGs (base64) so it can be mailed or attached as one file.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from numpy.typing import NDArray  # noqa: E402

from calibserve.calibration import ece, pareto_frontier, reliability_diagram  # noqa: E402
from calibserve.merge.select import OBJECTIVE_NAMES, objective_pair  # noqa: E402
from calibserve.merge.sweep import Point  # noqa: E402

__all__ = ["plot_metrics", "plot_plane", "plot_reliability", "write_json", "write_html"]

BASE_COLOR, ALIGNED_COLOR, SELECTED_COLOR = "#1f77b4", "#d62728", "#2ca02c"
FREE_FORM_COLOR = "#9467bd"


def plot_metrics(points: Sequence[Point], selected: float, path: Path) -> None:
    """Accuracy and ECE against lambda (two panels sharing the x axis): multiple choice, and
    the short answers' free-form confidence when they were scored."""
    lams = [p.lam for p in points]
    free_form = all(p.free_form_metrics is not None for p in points)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(lams, [p.accuracy for p in points], "o-", color=BASE_COLOR, label="multiple choice")
    ax2.plot(lams, [p.ece for p in points], "o-", color=ALIGNED_COLOR, label="multiple choice")
    if free_form:
        ff = [p.free_form_metrics or {} for p in points]
        ax1.plot(lams, [m["accuracy"] for m in ff], "s--", color=FREE_FORM_COLOR,
                 label="free form (short answers)")
        ax2.plot(lams, [m["ece"] for m in ff], "s--", color=FREE_FORM_COLOR,
                 label="free form (short answers)")
    ax1.set_ylabel("accuracy (select split)")
    ax2.set_ylabel("ECE (select split)")
    ax2.set_xlabel("lambda (0 = base, 1 = aligned)")
    for ax in (ax1, ax2):
        ax.axvline(selected, color=SELECTED_COLOR, ls="--", label=f"selected lambda={selected:g}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("Accuracy and calibration error along the interpolation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plane(ax: Any, pairs: Sequence[tuple[float, float]], lams: Sequence[float],
           selected: int, title: str) -> None:
    """One accuracy-ECE plane: every point labelled, its frontier joined, parents marked."""
    acc_ = [a for a, _ in pairs]
    ece_ = [e for _, e in pairs]
    ax.scatter(ece_, acc_, color="#7f7f7f", zorder=2, label="swept points")
    front = sorted(pareto_frontier(pairs), key=lambda i: ece_[i])
    ax.plot([ece_[i] for i in front], [acc_[i] for i in front], "-", color="#ff7f0e", zorder=3,
            label="Pareto frontier")
    for lam, a, e in zip(lams, acc_, ece_, strict=True):
        ax.annotate(f"{lam:g}", (e, a), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for lam, color, label in (
        (0.0, BASE_COLOR, "base (lambda=0)"),
        (1.0, ALIGNED_COLOR, "aligned (lambda=1)"),
    ):
        idx = [i for i, x in enumerate(lams) if x == lam]
        if idx:
            ax.scatter([ece_[idx[0]]], [acc_[idx[0]]], s=140, marker="s", color=color, zorder=4,
                       label=label)
    ax.scatter([ece_[selected]], [acc_[selected]], s=260, marker="*", color=SELECTED_COLOR,
               zorder=5, label=f"selected (lambda={lams[selected]:g})")
    ax.set_xlabel("ECE (lower is better)")
    ax.set_ylabel("accuracy (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def plot_plane(points: Sequence[Point], selected: int, path: Path) -> None:
    """Accuracy (y) against ECE (x) over lambda, each plane with its own frontier: multiple
    choice, and beside it the short answers (free-form confidence) when they were scored."""
    lams = [p.lam for p in points]
    planes = [("multiple choice", [objective_pair(p, "multiple-choice") for p in points])]
    if all(p.free_form_metrics is not None for p in points):
        planes.append(("free form (short answers)",
                       [objective_pair(p, "free-form") for p in points]))
    fig, axes = plt.subplots(1, len(planes), figsize=(7 * len(planes), 5.5), squeeze=False)
    for ax, (name, pairs) in zip(axes[0], planes, strict=True):
        _plane(ax, pairs, lams, selected, f"Accuracy-calibration plane, {name} (select split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(
    panels: Sequence[tuple[str, NDArray[np.float64], NDArray[np.bool_]]],
    n_bins: int,
    split: str,
    path: Path,
) -> None:
    """One reliability diagram per (title, confidence, correct)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.3), squeeze=False)
    for ax, (title, conf, correct) in zip(axes[0], panels, strict=True):
        d = reliability_diagram(conf, correct, n_bins)
        edges = np.asarray(d["bin_edges"], dtype=float)
        acc = np.asarray([np.nan if a is None else a for a in d["accuracy"]], dtype=float)
        width = np.diff(edges)
        ax.bar(
            edges[:-1],
            np.nan_to_num(acc),
            width=width,
            align="edge",
            color="#9ecae1",
            edgecolor="#3182bd",
            label="accuracy",
        )
        mc = np.asarray([np.nan if c is None else c for c in d["mean_confidence"]], dtype=float)
        ax.plot(mc, acc, "o", color="#08519c", ms=3)
        ax.plot([0, 1], [0, 1], "--", color="#555555", label="perfect calibration")
        ax.set_title(f"{title}\nECE {ece(conf, correct, n_bins):.3f}, n={len(conf)}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.suptitle(f"Reliability diagrams ({split} split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(report: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def write_html(report: Mapping[str, Any], plots_dir: Path, path: Path) -> None:
    """A single self-contained page: summary, tables and the embedded plots."""
    sel = report["selected"]
    fronts = {k: set(v) for k, v in (report.get("frontiers") or {}).items()}
    fronts.setdefault("multiple-choice", set(report["pareto_lambdas"]))
    div_keys = sorted({k for p in report["points"] for k in (p.get("diversity") or {})})
    ff_keys = ("accuracy", "ece", "brier", "nll", "auroc")
    free_form = all(p.get("free_form") for p in report["points"])
    header = [
        "lambda",
        "accuracy",
        "ECE",
        "Brier",
        "NLL",
        "mean conf",
        *div_keys,
        *([f"free-form {k if k != 'ece' else 'ECE'}" for k in ff_keys] if free_form else []),
        *(f"{name} frontier" for name in fronts),
        "selected",
    ]
    rows = [
        [
            f"{p['lambda']:g}",
            *(_fmt(p[k]) for k in ("accuracy", "ece", "brier", "nll", "mean_confidence")),
            *(_fmt((p.get("diversity") or {}).get(k)) for k in div_keys),
            *((_fmt(p["free_form"].get(k)) for k in ff_keys) if free_form else ()),
            *("yes" if p["lambda"] in lams else "" for lams in fronts.values()),
            "<<" if p["lambda"] == sel["lambda"] else "",
        ]
        for p in report["points"]
    ]
    cal = report["calibration"]
    thr_rows = [
        [t["target_accuracy"], _fmt(t["threshold"]), _fmt(t["coverage"])] for t in cal["thresholds"]
    ]
    held = report.get("heldout") or {}
    held_rows = [
        [name, *(_fmt(m.get(k)) for k in ("accuracy", "ece", "brier", "mean_confidence"))]
        for name, m in (held.get("models") or {}).items()
    ]
    held_ff = held.get("free_form") or {}
    held_ff_rows = [
        [name, *(_fmt((m or {}).get(k)) for k in ("accuracy", "ece", "brier", "auroc",
                                                    "mean_confidence"))]
        for name, m in held_ff.items()
    ]
    imgs = []
    for png in sorted(plots_dir.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode()
        imgs.append(
            f'<figure><img alt="{png.stem}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(png.name)}</figcaption></figure>"
        )
    parents = report["parents"]
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.get("notes", []))
    objective = str(sel.get("objective", "multiple-choice"))
    ff_info = report.get("free_form")
    ff_line = (
        f"<p>Short answers (n={report['short_answer_splits'].get('select', 0)} on the select "
        f"split) are generated at every lambda ({html.escape(ff_info['decoding'])}, at most "
        f"{ff_info['max_new_tokens']} tokens), scored by the free-form method "
        f"<code>{html.escape(ff_info['method'])}</code> (raw, before any map) and graded by "
        f"<code>{html.escape(ff_info['grader'])}</code>.</p>"
        if ff_info else "<p>No short answers were scored: the sweep is multiple choice only.</p>"
    )
    held_ff_html = (
        f"<h3>Short answers, free-form confidence (raw)</h3>"
        f"{_table(held_ff_rows, ['model', 'accuracy', 'ECE', 'Brier', 'AUROC', 'mean conf'])}"
        if held_ff_rows else ""
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>calibserve merge report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f2f2f2; }} figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
.summary {{ background: #f6fff6; border-left: 4px solid #2ca02c; padding: 0.5em 1em; }}
</style></head><body>
<h1>Merge report</h1>
<p>base: <code>{html.escape(parents["base"])}</code>, aligned:
<code>{html.escape(parents["aligned"])}</code>, method: {html.escape(report["method"])}</p>
<div class="summary"><p><b>Selected lambda = {sel["lambda"]:g}</b>
(objective {html.escape(OBJECTIVE_NAMES.get(objective, objective))}, rule
{html.escape(sel["rule"])}).
{html.escape(sel["reason"])}</p></div>
<h2>Sweep (select split, n={report["splits"]["select"]})</h2>
{ff_line}
{_table(rows, header)}
<h2>Calibrator ({html.escape(cal["calibrator"].get("type", "?"))}, calibrate split)</h2>
<p>ECE raw {_fmt(cal["calibrate"]["ece_raw"])}, calibrated
{_fmt(cal["calibrate"]["ece_calibrated"])}, n={cal["calibrate"]["n"]}</p>
{_table(thr_rows, ["target accuracy", "threshold", "coverage"])}
<h2>Held-out ({html.escape(str(held.get("split", "-")))} split)</h2>
{_table(held_rows, ["model", "accuracy", "ECE", "Brier", "mean conf"])}
{held_ff_html}
<h2>Plots</h2>
{"".join(imgs)}
<h2>Notes</h2><ul>{notes}</ul>
</body></html>
"""
    path.write_text(page, encoding="utf-8")

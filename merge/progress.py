"""What a merge shows on the console: progress bars while it runs, the frontier when it is done.

All of it goes to stderr through one `rich` console, which `--quiet` silences; nothing here
affects what is written.
"""

from __future__ import annotations

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

from calibserve.merge.select import OBJECTIVE_NAMES, Selection
from calibserve.merge.sweep import Point

__all__ = ["closing_table", "sweep_progress", "write_progress"]


def sweep_progress(console: Console, enabled: bool) -> Progress:
    """Points evaluated out of the grid (and out of the refinement round)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def write_progress(console: Console, enabled: bool) -> Progress:
    """Bytes of the selected model written, and how fast."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
    )


def closing_table(console: Console, points: list[Point], sel: Selection) -> None:
    """The frontier on the select split (of the objective that selected), the selected point
    marked, and why it was chosen; short-answer columns when they were scored."""
    free_form = all(q.free_form_metrics is not None for q in points)
    title = f"Pareto frontier (select split, {OBJECTIVE_NAMES[sel.objective]})"
    table = Table(title=title)
    cols = ["lambda", "accuracy", "ECE", "Brier", "mean conf"]
    if free_form:
        cols += ["free-form acc", "free-form ECE", "free-form AUROC"]
    for col in (*cols, ""):
        table.add_column(col, justify="right")
    for i in sel.frontier:
        q = points[i]
        row = [
            f"{q.lam:g}",
            f"{q.accuracy:.4f}",
            f"{q.ece:.4f}",
            f"{q.metrics['brier']:.4f}",
            f"{q.metrics['mean_confidence']:.4f}",
        ]
        if free_form and q.free_form_metrics is not None:
            ff = q.free_form_metrics
            row += [f"{ff['accuracy']:.4f}", f"{ff['ece']:.4f}", f"{ff['auroc']:.4f}"]
        table.add_row(*row, "selected" if i == sel.index else "")
    console.print(table)
    console.print(sel.reason)

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

from calibserve.merge.select import Selection
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
    """The frontier on the select split, the selected point marked, and why it was chosen."""
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

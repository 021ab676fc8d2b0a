"""What a tuning run shows on the console: one bar with the step, the loss and seconds per step.

Everything goes to stderr through one `rich` console, which `--quiet` silences; nothing here
affects what is trained or written.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["step_progress"]


def step_progress(console: Console, enabled: bool) -> Progress:
    """Optimizer steps out of the run's total; fields `loss` and `sps` (seconds per step)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[sps]} s/step"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )

"""What a tuning run shows on the console: one bar with the step, the loss and seconds per step.

Everything goes to stderr through one `rich` console, which `--quiet` silences; nothing here
affects what is trained or written. Where that console is no terminal (a log file, `nohup`, CI)
rich draws the bar only once, at the end, so `StepLog` prints a plain line every 5% of the steps
instead: a long run's log shows how far it is.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["step_log", "step_progress"]


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


def step_log(console: Console, enabled: bool, total: int, lines: int = 20
             ) -> Callable[[int, float, float], None]:
    """`(step, loss, seconds)` -> a plain line every `total / lines` steps and at the last one,
    only where the console is no terminal (a terminal has the bar)."""
    every = max(1, total // lines)

    def log(step: int, loss: float, seconds: float) -> None:
        if enabled and not console.is_terminal and (step % every == 0 or step == total):
            console.print(f"tune step {step}/{total} loss {loss:.4f} {seconds:.2f} s/step",
                          highlight=False)

    return log

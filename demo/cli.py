"""`calibserve demo build`: build (or reuse) the demo world and print what its models measure."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from calibserve.demo.settings import DemoSettings

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
_err = Console(stderr=True)


@app.callback()
def main() -> None:
    """The synthetic demo world and its tiny base / aligned / expert models."""


def _check_out(out: Path) -> None:
    """Fail early, naming the option, when --out cannot be written."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise typer.BadParameter(f"{probe} is not a directory", param_hint="--out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{probe} is not writable", param_hint="--out")


def _load_settings(path: Path) -> DemoSettings:
    try:
        return DemoSettings.model_validate_json(path.read_text())
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {path}: {exc.strerror}", param_hint="--settings"
        ) from None
    except ValidationError as exc:
        raise typer.BadParameter(
            f"invalid settings in {path}: {exc}", param_hint="--settings"
        ) from None


@app.command()
def build(
    out: Annotated[
        Path | None, typer.Option("--out", help="write the world here (default: the cache)")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="seed of the world and training")] = 0,
    settings_file: Annotated[
        Path | None,
        typer.Option("--settings", help="JSON file of DemoSettings overrides (for tuning)"),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress display")] = False,
) -> None:
    """Build the demo world (cached by settings hash; a second call is instant)."""
    if out is not None:
        _check_out(out)
    settings = _load_settings(settings_file) if settings_file is not None else DemoSettings()
    # Imported here: torch and transformers take seconds to import, and every `calibserve`
    # command (serve included) loads this module to build its command line.
    from calibserve.demo.build import MODELS, DemoBuildError, build_world

    try:
        path = build_world(out=out, seed=seed, settings=settings, progress=not quiet)
    except (DemoBuildError, OSError) as exc:
        _err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    report = json.loads((path / "world.json").read_text())
    metrics = report["metrics"]
    # Accuracy on the long-tail entities only the expert read about (worlds of version 8 on).
    tail = {name: by["long_tail"] for name, by in report.get("metrics_by_reading", {}).items()
            if isinstance(by, dict) and "long_tail" in by}
    table = Table(title=f"demo world (seed {seed}, test split, n={metrics['base']['n']})")
    columns = ["model", "accuracy", "ECE", "expected acc.", "mean conf."]
    if tail:
        columns.append(f"long-tail acc. (n={next(iter(tail.values()))['n']})")
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for name in MODELS:
        m = metrics[name]
        row = [name, f"{m['accuracy']:.3f}", f"{m['ece']:.3f}",
               f"{m['expected_accuracy']:.3f}", f"{m['mean_confidence']:.3f}"]
        if tail:
            row.append(f"{tail[name]['accuracy']:.3f}")
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(f"world: {path.resolve()}")

"""`calibserve merge`: the typer command (the lead registers `merge` on the main app).

Every option maps to a `MergeConfig` field, except `--free-form`: after the checkpoint is
written (still staged), fit the free-form confidence methods on the data directory's
short-answer items through the real serving path (a vLLM engine on the written checkpoint), so
one command gives a model with both multiple-choice and free-form calibration. That step composes
server and merge, so merge cannot import it: `merge_command(after_write)` builds the command with
it (the `calibserve` app passes `calibserve.serve_fit.fit_written_model`); the plain `merge`
refuses `--free-form`. Errors the user can fix are printed as one line that names the argument,
with exit status 2 and no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from calibserve.merge.config import DEFAULT_GRID, build_config
from calibserve.merge.errors import InvalidConfig, MergeError

if TYPE_CHECKING:  # the pipeline imports torch: not at start-up of the console script
    from calibserve.merge.pipeline import AfterWrite

__all__ = ["merge", "merge_command", "app"]


class Method(StrEnum):
    linear = "linear"
    slerp = "slerp"


class CalibratorName(StrEnum):
    """`auto` chooses the family by 5-fold held-out ECE; the others force one family."""

    auto = "auto"
    identity = "identity"
    temperature = "temperature"
    option_temperature = "option_temperature"
    platt = "platt"
    histogram = "histogram"
    isotonic = "isotonic"


class DType(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


DEFAULT_GRID_TEXT = "0:1:0.1"
assert len(DEFAULT_GRID) == 11


def merge_command(after_write: AfterWrite | None = None) -> Callable[..., None]:
    """The `merge` command; `after_write` is the `--free-form` step (None: refused)."""

    def merge(
        base: Annotated[str, typer.Option("--base", help="Base checkpoint: directory or Hub id.")],
        aligned: Annotated[
            str, typer.Option("--aligned", help="Aligned checkpoint: directory or Hub id.")
        ],
        data: Annotated[
            Path,
            typer.Option("--data",
                         help="Directory with select.jsonl, calibrate.jsonl [test.jsonl]."),
        ],
        out: Annotated[Path, typer.Option("--out", help="Output directory (created atomically).")],
        grid: Annotated[
            str,
            typer.Option(
                "--grid",
                help="Lambdas: a list 0,0.3,1 or a range start:stop:step; "
                "values above 1 extrapolate past the aligned model.",
            ),
        ] = DEFAULT_GRID_TEXT,
        method: Annotated[Method, typer.Option("--method", help="Interpolation.")] = Method.linear,
        select: Annotated[
            str,
            typer.Option(
                "--select", help="Selection rule: max-accuracy, min-ece, knee, min-ece-at-accuracy."
            ),
        ] = "max-accuracy",
        tolerance: Annotated[
            float, typer.Option("--tolerance", help="Accuracy tolerance of min-ece-at-accuracy.")
        ] = 0.01,
        calibrator: Annotated[
            CalibratorName,
            typer.Option("--calibrator", help="Calibrator fitted on the calibrate split; auto: the "
                         "family with the lowest held-out ECE (5-fold cross-validation)."),
        ] = CalibratorName.auto,
        diversity: Annotated[
            bool, typer.Option("--diversity/--no-diversity", help="Measure output diversity.")
        ] = False,
        refine: Annotated[
            bool, typer.Option("--refine/--no-refine", help="Add points around the frontier.")
        ] = True,
        device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")] = "cpu",
        dtype: Annotated[DType, typer.Option("--dtype", help="Evaluation dtype.")] = DType.float32,
        batch_size: Annotated[
            int, typer.Option("--batch-size", help="Evaluation batch size.")
        ] = 32,
        shard_size: Annotated[
            str, typer.Option("--shard-size", help="Maximum output shard size, e.g. 2GB.")
        ] = "2GB",
        target_accuracy: Annotated[
            list[float] | None,
            typer.Option(
                "--target-accuracy", help="Accuracy targets for escalation thresholds (repeatable)."
            ),
        ] = None,
        max_items: Annotated[
            int | None, typer.Option("--max-items", help="Use at most N items per split.")
        ] = None,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Replace an existing OUT when done.")
        ] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress display.")] = False,
        free_form: Annotated[
            bool, typer.Option(
                "--free-form/--no-free-form",
                help="Also fit the free-form methods (token statistics; verify when the tokenizer "
                "has yes/no tokens) on the short-answer items of --data (short_calibrate.jsonl, "
                "short_test.jsonl, or short-answer lines of calibrate/test.jsonl) through a vLLM "
                "engine on the written checkpoint."),
        ] = False,
    ) -> None:
        """Merge BASE and ALIGNED at the Pareto-optimal lambda, calibrate it, write it to OUT."""
        from calibserve.merge.evaluate import short_answer_split
        from calibserve.merge.pipeline import run_merge

        try:
            if free_form and after_write is None:
                raise InvalidConfig("this build of the command has no serving path; run "
                                    "`calibserve merge`", "--free-form")
            if free_form and not data.is_dir():
                raise InvalidConfig(f"{data} is not a directory", "--data")
            if free_form and not short_answer_split(data, "calibrate"):
                raise InvalidConfig(
                    f"{data} has no short-answer items to fit on (short_calibrate.jsonl, or "
                    "short-answer lines in calibrate.jsonl)", "--free-form")
            config = build_config(
                base=base,
                aligned=aligned,
                data=data,
                out=out,
                grid=grid,
                method=method.value,
                select=select,
                tolerance=tolerance,
                calibrator=calibrator.value,
                diversity=diversity,
                refine=refine,
                device=device,
                dtype=dtype.value,
                batch_size=batch_size,
                shard_size=shard_size,
                target_accuracy=target_accuracy if target_accuracy else [0.7, 0.8, 0.9],
                max_items=max_items,
                overwrite=overwrite,
            )
            run_merge(config, progress=not quiet, after_write=after_write if free_form else None)
        except MergeError as exc:
            where = f"Invalid value for '{exc.param}': " if exc.param else ""
            typer.echo(f"Error: {where}{exc.message}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted: rerun the same command to resume the sweep.", err=True)
            raise typer.Exit(130) from None
        sys.stdout.flush()

    return merge


merge = merge_command()


app = typer.Typer(add_completion=False, help="calibserve merge")
app.command("merge")(merge)

"""`calibserve calibrate`: calibration.json for one checkpoint, every method on its own data.

Beside the document it writes `probes.jsonl`, a copy of the held-out `test.jsonl` (when the data
has one): the server's default calibration probes (`calibserve serve --probe-rate N`).

The multiple-choice items fit the option-letter method (as merge does for the model it picks);
short-answer items, when the data directory has any (`short_calibrate.jsonl` / `short_test.jsonl`,
or short-answer lines mixed into `calibrate.jsonl` / `test.jsonl`), fit the free-form methods
through the real serving path (`calibserve.serve_fit`): the token statistics, `verify` (one extra
prompt-only request per question; by default when the tokenizer has yes/no tokens, `--verify`
requires them, `--no-verify` skips it) and, opt-in for its cost (k more generations per
question), `consistency`. Errors the user can fix are one line that names the argument, exit
status 2, nothing written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from calibserve.calibration.document import PROBES_FILE
from calibserve.merge.cli import CalibratorName
from calibserve.publish import write_atomic

__all__ = ["calibrate"]


def calibrate(
    model: Annotated[Path, typer.Option(
        "--model", help="checkpoint directory (weights, tokenizer with chat template)")],
    data: Annotated[Path, typer.Option(
        "--data", help="directory with calibrate.jsonl (multiple choice), optionally test.jsonl, "
        "short_calibrate.jsonl and short_test.jsonl (short answers)")],
    out: Annotated[Path, typer.Option("--out", help="the calibration.json to write")],
    calibrator: Annotated[CalibratorName, typer.Option(
        help="calibration map family; auto: the lowest held-out log loss (5-fold "
        "cross-validation grouped by question; README: how a map is chosen), per method")] = CalibratorName.auto,
    target_accuracy: Annotated[list[float] | None, typer.Option(
        "--target-accuracy", help="accuracy targets to store thresholds for (repeatable) "
        "[default: 0.7 0.8 0.9]")] = None,
    grader: Annotated[str | None, typer.Option(
        "--grader", help="short-answer grader module:function, called (reply, gold, aliases) "
        "-> bool [default: normalised exact match]")] = None,
    upstream: Annotated[str | None, typer.Option(
        "--upstream", help="answer short questions with this running vLLM (OpenAI base URL) "
        "serving --model, instead of starting a managed engine")] = None,
    max_tokens: Annotated[int, typer.Option(
        help="longest short-answer reply generated", min=1)] = 16,
    free_form: Annotated[bool, typer.Option(
        "--free-form/--no-free-form", help="fit the free-form methods on the short answers")
    ] = True,
    verify: Annotated[bool | None, typer.Option(
        "--verify/--no-verify", help="fit verify (P(yes) of one extra prompt-only request per "
        "reply); default: when the tokenizer has yes/no tokens, --verify: an error without "
        "them", show_default=False)] = None,
    consistency: Annotated[bool, typer.Option(
        "--consistency/--no-consistency", help="also fit consistency (agreement of k extra "
        "samples per reply: k more generations per question)")] = False,
    consistency_k: Annotated[int | None, typer.Option(
        "--consistency-k", min=2, help="samples per reply for consistency [default: 5]")
    ] = None,
    free_form_method: Annotated[str | None, typer.Option(
        "--free-form-method", help="serve this fitted method for free-form replies "
        "[default: the fitted one with the highest AUROC]")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out file")] = False,
) -> None:
    """Fit calibration.json for one checkpoint (an escalation tier, say), as merge does for the
    model it picks; serve it with `--escalate-calibration FILE` or put it in the checkpoint."""
    from calibserve.merge.calibrate_checkpoint import calibrate_checkpoint, check_inputs
    from calibserve.merge.errors import MergeError
    from calibserve.serve_fit import ServeFitError, calibrate_with_serving, load_grader

    targets = target_accuracy if target_accuracy else [0.7, 0.8, 0.9]
    try:
        check_inputs(model, data, out, calibrator.value, targets, overwrite)
        try:
            grade = load_grader(grader)
        except (ValueError, ImportError) as exc:
            typer.echo(f"Error: Invalid value for '--grader': {exc}", err=True)
            raise typer.Exit(2) from None
        if consistency_k is not None and not consistency:
            typer.echo("Error: Invalid value for '--consistency-k': only with --consistency",
                       err=True)
            raise typer.Exit(2)
        if free_form:
            doc = calibrate_with_serving(
                model, data, out, calibrator.value, targets, grader=grade, upstream=upstream,
                max_tokens=max_tokens, verify=verify, consistency=consistency,
                consistency_k=consistency_k, free_form=free_form_method)
        else:
            doc = calibrate_checkpoint(model, data, out, calibrator.value, targets)
    except MergeError as exc:
        where = f"Invalid value for '{exc.param}': " if exc.param else ""
        typer.echo(f"Error: {where}{exc.message}", err=True)
        raise typer.Exit(2) from None
    except ServeFitError as exc:
        where = f"Invalid value for '{exc.param}': " if exc.param else ""
        typer.echo(f"Error: {where}{exc.message}", err=True)
        raise typer.Exit(2 if exc.param else 1) from None
    test_split = data / "test.jsonl"
    if test_split.is_file():
        # The server's default probes: the held-out split, never the items fitted on.
        probes = out.parent / PROBES_FILE
        write_atomic(probes, test_split.read_text(encoding="utf-8"))
        typer.echo(f"{probes}: probe split for `calibserve serve --probe-rate N` (from "
                   f"{test_split.name})")
    for name, entry in doc.methods.items():
        fit = entry.fit
        if fit is None:
            typer.echo(f"{out}: {name}: no calibrator (no data of its kind)")
            continue
        if fit.n == 0:
            typer.echo(f"{out}: {name}: no calibrator ({'; '.join(fit.notes or [])})")
            continue
        area = f", AUROC {fit.auroc:.3f}" if fit.auroc is not None else ""
        typer.echo(f"{out}: {name}: {fit.calibrator or calibrator.value} calibrator, ECE on "
                   f"{fit.n} calibrate items {fit.ece_raw:.3f} raw -> {fit.ece_calibrated:.3f} "
                   f"calibrated (accuracy {fit.accuracy if fit.accuracy is not None else 0:.3f}"
                   f"{area})")
    for note in (doc.metrics.get("short_answer") or {}).get("notes") or []:
        typer.echo(f"{out}: note: {note}")
    typer.echo(f"{out}: multiple_choice={doc.multiple_choice} free_form={doc.free_form}")

"""`calibserve calibrate`: calibration.json for one checkpoint, every method on its own data.

Beside the document it writes `probes.jsonl`, a copy of the held-out `test.jsonl` (when the data
has one): the server's default calibration probes (`calibserve serve --probe-rate N`).

The multiple-choice items fit the option-letter method (as merge does for the model it picks);
short-answer items, when the data directory has any (`short_calibrate.jsonl` / `short_test.jsonl`,
or short-answer lines mixed into `calibrate.jsonl` / `test.jsonl`), fit the free-form methods
through the real serving path (`calibserve.fit`): the token statistics, `verify` (one extra
prompt-only request per question; by default when the tokenizer has yes/no tokens, `--verify`
requires them, `--no-verify` skips it) and, opt-in for its cost (k more generations per
question), `consistency`. Errors the user can fix are one line that names the argument, exit
status 2, nothing written.

`--label-free --reference BASE` fits the option-letter method with no labels (DACA,
calibration/label_free.py; fit/label_free.py): `--data` is any JSONL of multiple-choice
questions (answers, if present, are ignored) or a directory whose calibrate.jsonl it is. The
document records `fit.labels: "none"`, the agreement and the items fitted on, has no thresholds
(they need labels), and its replies are served with `confidence.calibration: "label-free"`. The
free-form methods need graded answers and are not fitted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from calibserve.calibration.certified import GuaranteeTargets
from calibserve.calibration.document import PROBES_FILE
from calibserve.calibration.guarantee import DEFAULT_DELTA
from calibserve.calibration.risk import DEFAULT_TARGET_ACCURACIES
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
        "cross-validation grouped by question; README: how a map is chosen), per method")
    ] = CalibratorName.auto,
    target_accuracy: Annotated[list[float] | None, typer.Option(
        "--target-accuracy", help="accuracy targets to store thresholds for (repeatable) "
        f"[default: {' '.join(f'{t:g}' for t in DEFAULT_TARGET_ACCURACIES)}]")] = None,
    max_error: Annotated[list[float] | None, typer.Option(
        "--max-error", help="also certify, per method, the threshold whose kept answers are "
        "wrong at most this often with probability 1 - --delta (repeatable; serve it with "
        "--threshold guaranteed; README: certified thresholds); a target no threshold can "
        "certify is refused")] = None,
    delta: Annotated[float, typer.Option(
        "--delta", help="with --max-error: the chance the certificate may be wrong")
    ] = DEFAULT_DELTA,
    batch: Annotated[int | None, typer.Option(
        "--batch", help="with --max-error: certify every batch of at least M kept answers (a "
        "day's traffic, say), not only the long-run rate (costs coverage)", metavar="M")
    ] = None,
    grader: Annotated[str | None, typer.Option(
        "--grader", help="short-answer grader: exact (default), contains, or module:function, "
        "called (reply, gold, aliases) -> bool")] = None,
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
    label_free: Annotated[bool, typer.Option(
        "--label-free", help="fit the option-letter temperature with no labels (DACA: the "
        "model's option distribution tempered towards --reference's, on the questions where "
        "both pick the same option); --data may be any JSONL of multiple-choice questions, "
        "answers ignored; no thresholds (they need labels)")] = False,
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="with --label-free: the base checkpoint --model was post-trained "
        "from (asked the same prompts in --model's tokens)")] = None,
) -> None:
    """Fit calibration.json for one checkpoint (an escalation tier, say), as merge does for the
    model it picks; serve it with `--escalate-calibration FILE` or put it in the checkpoint."""
    from calibserve.calibration.grading import load_grader
    from calibserve.fit.errors import ServeFitError
    from calibserve.fit.multiple_choice import calibrate_checkpoint, check_inputs
    from calibserve.fit.serve_fit import calibrate_with_serving
    from calibserve.merge.errors import MergeError

    if batch is not None and not max_error:
        _refuse("--batch", "only with --max-error (it certifies batches of the kept answers)")
    if label_free or reference is not None:
        if max_error:
            _refuse("--max-error", "a label-free fit has no thresholds: a certified error rate "
                    "needs labelled data")
        _calibrate_label_free(model, data, out, reference, label_free, calibrator,
                              target_accuracy, overwrite)
        return
    targets = target_accuracy if target_accuracy else list(DEFAULT_TARGET_ACCURACIES)
    guarantees = _guarantee_targets(max_error, delta, batch)
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
                consistency_k=consistency_k, free_form=free_form_method, guarantees=guarantees)
        else:
            doc = calibrate_checkpoint(model, data, out, calibrator.value, targets,
                                       guarantees=guarantees)
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
        for g in entry.guarantees:
            batch_of = "" if g.batch is None else (
                f" in any batch of at least {g.batch} kept answers (rate certified <= "
                f"{g.target:.4f} at delta {g.delta / 2:g})")
            typer.echo(f"{out}: {name}: certified threshold {g.threshold:.4f} for max_error "
                       f"{g.max_error:g}{batch_of} (delta {g.delta:g}): keeps {g.coverage:.1%} "
                       f"of {g.n} items, {g.kept_errors} of {g.kept} kept wrong, upper bound "
                       f"{g.bound:.4f}")
    for note in (doc.metrics.get("short_answer") or {}).get("notes") or []:
        typer.echo(f"{out}: note: {note}")
    typer.echo(f"{out}: multiple_choice={doc.multiple_choice} free_form={doc.free_form}")


def _guarantee_targets(max_error: list[float] | None, delta: float, batch: int | None
                       ) -> GuaranteeTargets:
    """`--max-error` / `--delta` / `--batch` as the fit's certification targets (bad values:
    exit 2)."""
    from calibserve.calibration import CalibrationError

    try:
        return GuaranteeTargets(tuple(max_error or ()), delta, batch)
    except CalibrationError as exc:
        message = str(exc)
        _refuse("--batch" if message.startswith("batch") else
                "--delta" if "delta" in message else "--max-error", message)
        raise AssertionError("unreachable") from exc


def _refuse(param: str, message: str) -> None:
    typer.echo(f"Error: Invalid value for '{param}': {message}", err=True)
    raise typer.Exit(2)


def _calibrate_label_free(model: Path, data: Path, out: Path, reference: Path | None,
                          label_free: bool, calibrator: CalibratorName,
                          target_accuracy: list[float] | None, overwrite: bool) -> None:
    """`calibrate --label-free --reference BASE`: the option temperature by DACA, no labels."""
    from calibserve.fit.label_free import calibrate_label_free, check_label_free_inputs
    from calibserve.merge.calibrate import LABEL_FREE_NOTE
    from calibserve.merge.errors import MergeError
    from calibserve.merge.evaluate import short_answer_split

    if not label_free:
        _refuse("--reference", "only with --label-free (the labelled fit reads no reference)")
    if calibrator not in (CalibratorName.auto, CalibratorName.option_temperature):
        _refuse("--calibrator", f"--label-free fits the option temperature only, not "
                f"{calibrator.value}")
    if target_accuracy:
        _refuse("--target-accuracy", "a label-free fit has no thresholds: a threshold that "
                "promises an accuracy needs labelled data")
    try:
        check_label_free_inputs(model, reference, data, out, overwrite)
        assert reference is not None  # checked: --label-free needs it
        doc = calibrate_label_free(model, reference, data, out)
    except MergeError as exc:
        where = f"Invalid value for '{exc.param}': " if exc.param else ""
        typer.echo(f"Error: {where}{exc.message}", err=True)
        raise typer.Exit(2) from None
    test_split = data / "test.jsonl" if data.is_dir() else None
    if test_split is not None and test_split.is_file():
        probes = out.parent / PROBES_FILE
        write_atomic(probes, test_split.read_text(encoding="utf-8"))
        typer.echo(f"{probes}: probe split for `calibserve serve --probe-rate N` (from "
                   f"{test_split.name})")
    fit = doc.method("answer").fit
    assert fit is not None
    typer.echo(f"{out}: answer: option temperature {doc.temperature():.3f} fitted label-free "
               f"(DACA) against {reference} on the {fit.n_agree} of {fit.n} questions where "
               f"both models pick the same option (agreement {fit.agreement or 0.0:.3f}); "
               "no labels read")
    typer.echo(f"{out}: answer: fit.labels=none; replies are served with "
               "confidence.calibration=label-free")
    typer.echo(f"{out}: answer: {LABEL_FREE_NOTE}")
    for note in fit.notes or []:
        if note != LABEL_FREE_NOTE:
            typer.echo(f"{out}: note: {note}")
    held, raw = doc.metrics.get("test"), doc.metrics.get("test_raw")
    if isinstance(held, dict) and isinstance(raw, dict):
        typer.echo(f"{out}: held out ({held['n']} items of test.jsonl, their answers used to "
                   f"report only): ECE {raw['ece']:.3f} raw -> {held['ece']:.3f} served")
    if data.is_dir() and short_answer_split(data, "calibrate"):
        typer.echo(f"{out}: free-form methods not fitted (they need graded answers)")
    typer.echo(f"{out}: multiple_choice={doc.multiple_choice} free_form={doc.free_form}")

"""Free-form calibrators fitted through the real serving path (`calibserve calibrate`).

The option-letter method is fitted offline on multiple-choice items (`multiple_choice`: merge's
evaluator). The free-form methods score what the model actually generates, so their calibrators
are fitted on what calibserve actually serves (`passes`: a real vLLM engine behind calibserve's
own app, each short-answer question one plain user chat message). For each reply:

- the served `choices[0].confidence.raw` is the raw confidence of the method that served it; the
  token statistics are recomputed from the returned logprobs with calibration's own
  `confidence_score` (and the served one is checked against its recomputation, `raw`);
- `verify` and `consistency` cannot be recomputed: they are what the server's extra request
  (routing/confidence_work.py) returned. Each is read from a serving pass whose document names it
  as `free_form` (no map yet: its raw is served, `document.serving_document`): the `verify` pass
  also gives the token statistics (same replies, same logprobs); `consistency` (opt-in, k more
  generations per question) has a pass of its own. A method that needs extra work is fitted on
  the replies it actually served (the others were served by `answer`, an option letter, or by
  the `mean` fallback when the extra request gave no verdict or failed; counted in the fit's
  notes);
- the reply is graded against the gold answer and its aliases (`answers.exact_match` by default,
  or any `Grader`: `--grader contains`, `--grader module:function`).

Which methods (`methods`, `verdict`), each method's fit (`method_fit`), the choice of `free_form`
(`free_form`), `no_letter` on the multiple-choice items asked in the same pass (`no_letter`) and
the document (`document`) are modules of their own; this one runs them in order:
`serve_and_fit` (one checkpoint's passes and fits), `calibrate_with_serving` (`calibserve
calibrate`), `fit_written_model` (`calibserve merge --free-form`).

This composes server and merge, so it lives in fit/ (merge must not import server).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from calibserve.calibration import (
    DEFAULT_TARGET_ACCURACIES,
    N_BINS,
    CalibrationDocument,
    MethodParams,
)
from calibserve.calibration.answers import Grader, exact_match
from calibserve.calibration.certified import NO_GUARANTEES, GuaranteeTargets, refusals
from calibserve.calibration.mc_prompt import format_mc_prompt
from calibserve.fit.document import serving_document, with_free_form
from calibserve.fit.errors import ServeFitError
from calibserve.fit.free_form import FreeFormFit, fit_free_form
from calibserve.fit.methods import DEFAULT_FIT_METHODS, FREE_FORM_FIT_METHODS, fit_methods
from calibserve.fit.no_letter import fit_no_letter, mc_splits
from calibserve.fit.passes import Split, extra_request_notes, serve_passes
from calibserve.fit.verdict import check_verify, checkpoint_verdict_ids

__all__ = [
    "calibrate_with_serving",
    "fit_written_model",
    "serve_and_fit",
]


def serve_and_fit(
    model_dir: Path,
    doc: CalibrationDocument,
    short_cal: Sequence[Mapping[str, Any]],
    short_test: Sequence[Mapping[str, Any]] = (),
    *,
    methods: Sequence[str] = DEFAULT_FIT_METHODS,
    kind: str = "auto",
    targets: Sequence[float] = DEFAULT_TARGET_ACCURACIES,
    grader: Grader = exact_match,
    upstream: str | None = None,
    upstream_model: str | None = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    consistency_k: int | None = None,
    free_form: str | None = None,
    n_bins: int = N_BINS,
    mc_cal: Sequence[Mapping[str, Any]] = (),
    mc_test: Sequence[Mapping[str, Any]] = (),
    guarantees: GuaranteeTargets = NO_GUARANTEES,
) -> FreeFormFit:
    """Serve the short answers with `doc` (the option-letter document) through the serving path
    and fit every method in `methods` (see the module docstring): one pass serving `verify`
    when it is asked for (else `doc` as it is), one more serving `consistency` when asked for.
    The multiple-choice items `mc_cal` / `mc_test` go through the first pass too, for
    `no_letter` (`fit_no_letter`). Checks `verify`'s tokenizer first (`ServeFitError`, param
    `--verify`)."""
    unknown = [m for m in methods if m not in FREE_FORM_FIT_METHODS]
    if unknown:
        raise ServeFitError(f"cannot fit {', '.join(unknown)}; free-form methods: "
                            f"{', '.join(FREE_FORM_FIT_METHODS)}")
    params: dict[str, MethodParams] = {}
    if "verify" in methods:
        check_verify(model_dir)
        # The verdict request asks for exactly these logprobs, in the fit as when served.
        params["verify"] = MethodParams(verdict_token_ids=checkpoint_verdict_ids(model_dir))
    questions = [str(it["question"]) for it in [*short_cal, *short_test]]
    n_cal, n_short = len(short_cal), len(questions)
    mc_prompts = [format_mc_prompt(it) for it in [*mc_cal, *mc_test]]
    if "consistency" in methods and consistency_k is not None:
        params["consistency"] = MethodParams(k=consistency_k)

    with tempfile.TemporaryDirectory(prefix="calibserve-fit-") as tmp:
        work = Path(tmp)
        first = ("verify" if "verify" in methods else None)
        docs = [(serving_document(doc, first, params.get(first), work / f"{first}.json")
                 if first is not None else doc.write(work / "calibration.json"))]
        if "consistency" in methods:
            docs.append(serving_document(doc, "consistency", params.get("consistency"),
                                         work / "consistency.json"))
        runs = serve_passes(
            questions, docs, model_dir=None if upstream is not None else model_dir,
            upstream=upstream, upstream_model=upstream_model, max_tokens=max_tokens,
            temperature=temperature, mc_questions=mc_prompts)
    served = [run.replies for run in runs]
    cal_replies, test_replies = served[0][:n_cal], served[0][n_cal:n_short]
    mc_replies = served[0][n_short:]
    passes: dict[str, Split] = {}
    test_passes: dict[str, Split] = {}
    if "consistency" in methods:
        passes["consistency"] = (short_cal, served[1][:n_cal])
        test_passes["consistency"] = (short_test, served[1][n_cal:])
    fit = fit_free_form(
        (short_cal, cal_replies), (short_test, test_replies) if short_test else None,
        grader=grader, kind=kind, targets=targets, methods=methods, q=doc.quantile(),
        n_bins=n_bins, passes=passes, test_passes=test_passes, params=params,
        free_form=free_form, guarantees=guarantees,
    )
    extra: dict[str, dict[str, int]] = {}
    for run in runs:
        extra.update(run.extra_requests)
    fit.report["extra_requests"] = extra
    fit.notes.extend(extra_request_notes(extra))
    if mc_cal:
        fit.no_letter = fit_no_letter(
            (mc_cal, mc_replies[:len(mc_cal)]),
            (mc_test, mc_replies[len(mc_cal):]) if mc_test else None,
            kind=kind, targets=targets, n_bins=n_bins, guarantees=guarantees)
    return fit


def calibrate_with_serving(
    model_dir: Path,
    data_dir: Path,
    out_file: Path,
    calibrator: str = "auto",
    targets: Sequence[float] = DEFAULT_TARGET_ACCURACIES,
    *,
    grader: Grader = exact_match,
    upstream: str | None = None,
    upstream_model: str | None = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    methods: Sequence[str] | None = None,
    n_bins: int = N_BINS,
    verify: bool | None = None,
    consistency: bool = False,
    consistency_k: int | None = None,
    free_form: str | None = None,
    guarantees: GuaranteeTargets = NO_GUARANTEES,
) -> CalibrationDocument:
    """`calibserve calibrate`: the option-letter method fitted on the multiple-choice items
    (`fit.multiple_choice.calibrate_checkpoint`), then, when `data_dir` has short-answer items
    (`merge.evaluate.SHORT_ANSWER_FILES`), the free-form methods through the serving path
    (`serve_and_fit`). `methods` None: the token statistics, `verify` (None: when the tokenizer
    has yes/no tokens; True: required; False: not) and `consistency` when asked for. The
    document is written to `out_file` after each stage (atomically); a method that cannot be
    fitted is refused before anything is written. `guarantees`: certified thresholds per method
    (`calibration.certified`); a served method that cannot be certified is refused
    (`ServeFitError`, `--max-error`): before anything is written for the option-letter method,
    after the serving pass for the free-form one (the file written after the first stage is
    then removed)."""
    from calibserve.fit.multiple_choice import calibrate_checkpoint
    from calibserve.merge.evaluate import short_answer_split

    short_cal = short_answer_split(data_dir, "calibrate")
    notes: list[str] = []
    if methods is None:
        chosen, notes = (fit_methods(model_dir, verify, consistency) if short_cal
                         else ((), []))
    else:
        chosen = tuple(methods)
        if "verify" in chosen and short_cal:
            check_verify(model_dir)
    if free_form is not None and free_form not in FREE_FORM_FIT_METHODS:
        raise ServeFitError(f"unknown free-form method {free_form!r}; valid: "
                            f"{', '.join(FREE_FORM_FIT_METHODS)}", "--free-form-method")
    if free_form is not None and short_cal and free_form not in chosen:
        raise ServeFitError(f"{free_form!r} is not fitted (fitted: {', '.join(chosen)})",
                            "--free-form-method")
    doc = calibrate_checkpoint(model_dir, data_dir, out_file, calibrator, targets, n_bins,
                               guarantees=guarantees)
    if not short_cal:
        return doc
    short_test = short_answer_split(data_dir, "test")
    kind = "auto" if calibrator == "option_temperature" else calibrator
    # The answering server scores with the document just written: what will be served.
    mc_cal, mc_test = mc_splits(data_dir)
    fit = serve_and_fit(
        model_dir, doc, short_cal, short_test, methods=chosen, kind=kind, targets=targets,
        grader=grader, upstream=upstream, upstream_model=upstream_model,
        max_tokens=max_tokens, temperature=temperature, consistency_k=consistency_k,
        free_form=free_form, n_bins=n_bins, mc_cal=mc_cal, mc_test=mc_test,
        guarantees=guarantees,
    )
    fit.notes[:0] = notes
    doc = with_free_form(doc, fit)
    refused = refusals(doc, guarantees)
    if refused:
        Path(out_file).unlink(missing_ok=True)  # the first stage's file: not a certified one
        raise ServeFitError("cannot certify max_error " + "; ".join(refused), "--max-error")
    doc.write(out_file)
    return doc


def fit_written_model(model_dir: Path, data_dir: Path) -> CalibrationDocument:
    """`calibserve merge --free-form`: the written checkpoint's calibration.json (its
    multiple-choice fit) extended with the free-form methods fitted on `data_dir`'s short-answer
    items through a managed vLLM engine on `model_dir` (`serve_and_fit`; verify when the
    tokenizer has yes/no tokens); rewritten in place, atomically. The free-form methods are
    certified for the max_error targets (and delta, and batch) the multiple-choice method was
    certified for (`merge --max-error`); a served free-form method that cannot be is refused
    (InvalidConfig, `--max-error`) before the document is rewritten."""
    from calibserve.merge.errors import InvalidConfig
    from calibserve.merge.evaluate import short_answer_split

    path = Path(model_dir) / "calibration.json"
    doc = CalibrationDocument.load(path)
    certified = doc.method(doc.multiple_choice).guarantees
    guarantees = (GuaranteeTargets(tuple(sorted({g.max_error for g in certified})),
                                   certified[0].delta, certified[0].batch)
                  if certified else NO_GUARANTEES)
    short_cal = short_answer_split(data_dir, "calibrate")
    if not short_cal:
        raise ServeFitError(f"{data_dir} has no short-answer items to fit on", "--free-form")
    methods, notes = fit_methods(Path(model_dir), None, False)
    mc_cal, mc_test = mc_splits(data_dir)
    fit = serve_and_fit(Path(model_dir), doc, short_cal, short_answer_split(data_dir, "test"),
                        methods=methods, mc_cal=mc_cal, mc_test=mc_test, guarantees=guarantees)
    fit.notes[:0] = notes
    doc = with_free_form(doc, fit)
    refused = refusals(doc, guarantees)
    if refused:
        raise InvalidConfig("cannot certify max_error " + "; ".join(refused), "--max-error")
    doc.write(path)
    return doc

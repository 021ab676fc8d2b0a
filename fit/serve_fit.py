"""Free-form calibrators fitted through the real serving path (`calibserve calibrate`).

The option-letter method is fitted offline on multiple-choice items (merge's evaluator). The
free-form methods score what the model actually generates, so their calibrators are fitted on
what calibserve actually serves: a real vLLM engine on the checkpoint (calibserve's managed
engine, or `upstream=` an engine already running), calibserve's own app in this process
(`server.app.create_app` over `httpx.ASGITransport`), each short-answer question sent as one plain
user chat message. For each reply:

- the served `choices[0].confidence.raw` is the raw confidence of the method that served it; the
  token statistics are recomputed from the returned logprobs with calibration's own
  `confidence_score` (and the served one is checked against its recomputation);
- `verify` and `consistency` cannot be recomputed: they are what the server's extra request
  (routing/confidence_work.py) returned. Each is read from a serving pass whose document names it
  as `free_form` (no map yet: its raw is served): the `verify` pass also gives the token
  statistics (same replies, same logprobs); `consistency` (opt-in, k more generations per
  question) has a pass of its own. A method that needs extra work is fitted on the replies it
  actually served (the others were served by `answer`, an option letter, or by the `mean`
  fallback when the extra request gave no verdict or failed; counted in the fit's notes);
- the reply is graded against the gold answer and its aliases (`answers.exact_match` by default,
  or any `Grader`: `--grader module:function`).

`verify` needs a tokenizer with a yes and a no token (`calibration.require_verdict_tokens`): by
default (`verify=None`) it is fitted when the checkpoint's tokenizer has them and left out with a
note otherwise; `verify=True` refuses such a tokenizer (`ServeFitError` naming `--verify`) before
anything is written.

Every method is then fitted on its graded replies with the family choice of
`calibration.choose_calibrator` (or one forced family), with escalation thresholds of its own, into
the document's `methods` (fit metrics: ECE raw and calibrated, AUROC, accuracy, the family's
held-out ECE). `free_form` is the fitted method with the highest AUROC (raw confidence, right vs
wrong, on the calibrate split, each method on the replies it served; an undefined AUROC, one class
only, counts as 0.5; ties: the earlier in the list), unless one is forced (`free_form=`); when no
method could be fitted `free_form` stays `mean` with no calibrator, served `calibrated: false`.
Single-class data (every reply wrong) is fitted by Platt's smoothed constant
(`calibration.family`), so an always-wrong model is served ~0. A `test` split of short answers is
reported per method in `metrics.short_answer`.

The token statistics are fitted over every reply, also those whose first token is an option letter
(a short-answer question offers no options, so the server serves them with the free-form method
too); the count of such replies is recorded (`metrics.short_answer.calibrate.served_by_answer`,
0 unless a question reads as offering options).

`no_letter` (a reply to a multiple-choice prompt that names no option letter, calibration/
methods.py) is fitted on the same pass: the multiple-choice items (`mc_cal`, and `mc_test` to
report) are sent too, each as its own user message (`format_mc_prompt`); the replies the server
scored by `no_letter` are graded by `answers.option_letter` against the gold letter and fitted
like the free-form methods (an always-wrong kind of reply gets Platt's smoothed constant, near 0).
Fewer than `MIN_NO_LETTER` such replies: no map (served `calibrated: false`), with a note.

This module composes server and merge, so it lives in fit/ (merge must not import server).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from calibserve.calibration import (
    DEFAULT_TARGET_ACCURACIES,
    N_BINS,
    CalibrationDocument,
    DegenerateDataError,
    FitMetrics,
    MethodCalibration,
    MethodParams,
    NoVerdictTokensError,
    ServedMethod,
    Threshold,
    VerdictTokens,
    auroc,
    choose_calibrator,
    confidence_method,
    confidence_score,
    ece,
    require_verdict_tokens,
    verdict_tokens,
)
from calibserve.calibration.answers import Grader, exact_match, option_letter
from calibserve.calibration.certified import (
    NO_GUARANTEES,
    GuaranteeTargets,
    certified_thresholds,
    refusals,
)
from calibserve.calibration.grading import load_grader
from calibserve.calibration.mc_prompt import LETTERS, format_mc_prompt
from calibserve.calibration.methods import NO_LETTER
from calibserve.calibration.verify import verdict_word
from calibserve.merge.calibrate import thresholds_for

__all__ = [
    "DEFAULT_FIT_METHODS",
    "FREE_FORM_FIT_METHODS",
    "TOKEN_FIT_METHODS",
    "FreeFormFit",
    "MIN_NO_LETTER",
    "Reply",
    "ServeFitError",
    "ServedPass",
    "ask_short_answers",
    "calibrate_with_serving",
    "check_verify",
    "checkpoint_verdict_ids",
    "checkpoint_verdict_tokens",
    "fit_free_form",
    "fit_methods",
    "fit_no_letter",
    "fit_written_model",
    "load_grader",
    "method_raw",
    "serve_and_fit",
    "serve_passes",
    "served_raw",
    "extra_request_notes",
    "with_free_form",
    "with_no_letter",
]

# The token statistics: recomputed from any reply's logprobs.
TOKEN_FIT_METHODS: tuple[str, ...] = ("mean", "min", "first", "quantile")
# Every free-form method the fit can fit; `verify` and `consistency` are read from the serving
# pass that served them (their extra requests are the server's own).
FREE_FORM_FIT_METHODS: tuple[str, ...] = (*TOKEN_FIT_METHODS, "verify", "consistency")
# What `calibserve calibrate` fits unless told otherwise: consistency costs k generations per
# reply, so it is opt-in; verify is fitted when the tokenizer has yes/no tokens.
DEFAULT_FIT_METHODS: tuple[str, ...] = (*TOKEN_FIT_METHODS, "verify")
SERVED_NAME = "calibserve-fit"
# Served and recomputed raw confidences must agree to float rounding.
RAW_TOLERANCE = 1e-9
# Below this many letterless replies to the multiple-choice calibrate items, `no_letter` gets no
# map: a map fitted on a handful of replies would be checked on nothing.
MIN_NO_LETTER = 20


class ServeFitError(RuntimeError):
    """The serving path did not give what the fit needs (a failed request, a raw that differs),
    or a method cannot be fitted on this checkpoint; `param` names the option at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class Reply:
    """One short-answer question as served: the reply text, `confidence`, `logprobs`."""

    text: str
    confidence: Mapping[str, Any]
    logprobs: Any


def _settings(model_dir: Path | None, upstream: str | None, upstream_model: str | None,
              calibration: Path | None) -> Any:
    from calibserve.server.config import ModelSettings, ServerSettings

    source: dict[str, Any] = (
        {"upstreams": [upstream], "upstream_model": upstream_model}
        if upstream is not None else {"model": model_dir}
    )
    model = ModelSettings(name=SERVED_NAME, calibration=calibration, **source)
    return ServerSettings(models=[model], signing_key=secrets.token_hex(16), log_level="warning")


# `calibserve_confidence_requests_total` outcomes (routing/confidence_work.py).
EXTRA_OUTCOMES = ("ok", "no_verdict", "error", "unsupported")


@dataclass(frozen=True)
class ServedPass:
    """One pass of the questions through the serving path: the replies, and how the server's
    extra requests ended (`{method: {outcome: count}}`, from its own counter)."""

    replies: list[Reply]
    extra_requests: dict[str, dict[str, int]]


def _extra_requests(runtime: Any) -> dict[str, dict[str, int]]:
    registry = runtime.routing_metrics.registry
    out: dict[str, dict[str, int]] = {}
    for method in ("verify", "consistency"):
        counts = {o: int(registry.get_sample_value(
            "calibserve_confidence_requests_total",
            {"route": SERVED_NAME, "method": method, "outcome": o}) or 0)
            for o in EXTRA_OUTCOMES}
        if any(counts.values()):
            out[method] = counts
    return out


async def _ask(
    settings: Any, questions: Sequence[str], max_tokens: int, temperature: float,
    concurrency: int, then: Sequence[Path] = (), mc_questions: Sequence[str] = (),
) -> list[ServedPass]:
    """The questions served with `settings` (and `mc_questions` after them), then the questions
    again with each document of `then` (a calibserve app over the same engine: the managed one
    when `settings` has one)."""
    from calibserve.server.app import create_app
    from calibserve.server.runtime import ServerRuntime

    async def served(settings: Any, runtime: Any, asked: Sequence[str]) -> ServedPass:
        app = create_app(settings, runtime)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://calibserve",
                                     timeout=600) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one(question: str) -> Reply:
                body = {"model": SERVED_NAME, "max_tokens": max_tokens,
                        "temperature": temperature, "logprobs": True, "top_logprobs": 5,
                        "messages": [{"role": "user", "content": question}]}
                async with gate:
                    r = await client.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    raise ServeFitError(f"the serving path answered {r.status_code}: {r.text}")
                choice = r.json()["choices"][0]
                text = (choice.get("message") or {}).get("content") or ""
                return Reply(text, choice["confidence"], choice.get("logprobs"))

            replies = list(await asyncio.gather(*(one(q) for q in asked)))
            return ServedPass(replies, _extra_requests(runtime))

    runtime = ServerRuntime(settings)
    await runtime.start()
    try:
        out = [await served(settings, runtime, [*questions, *mc_questions])]
        model = settings.models[0]
        engine = runtime.models[model.name].primary.engine
        upstream = engine.url if engine is not None else model.upstreams[0]
        upstream_model = SERVED_NAME if engine is not None else model.upstream_model
        for calibration in then:
            again = _settings(None, upstream, upstream_model, calibration)
            other = ServerRuntime(again)
            await other.start()
            try:
                out.append(await served(again, other, questions))
            finally:
                await other.stop()
        return out
    finally:
        await runtime.stop()


def ask_short_answers(
    questions: Sequence[str],
    *,
    model_dir: Path | None = None,
    upstream: str | None = None,
    upstream_model: str | None = None,
    calibration: Path | None = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    concurrency: int = 8,
) -> list[Reply]:
    """Each question as a plain user message through calibserve's app: a managed vLLM engine on
    `model_dir`, or the vLLM at `upstream`; served with `calibration` (a calibration.json)."""
    return serve_passes(questions, [calibration], model_dir=model_dir, upstream=upstream,
                        upstream_model=upstream_model, max_tokens=max_tokens,
                        temperature=temperature, concurrency=concurrency)[0].replies


def serve_passes(
    questions: Sequence[str],
    calibrations: Sequence[Path | None],
    *,
    model_dir: Path | None = None,
    upstream: str | None = None,
    upstream_model: str | None = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    concurrency: int = 8,
    mc_questions: Sequence[str] = (),
) -> list[ServedPass]:
    """`ask_short_answers` once per calibration document, one engine for all of them (a managed
    engine on `model_dir` is started once), with how each pass's extra requests (verify,
    consistency) ended. `mc_questions` (multiple-choice prompts) are asked in the first pass
    only, after `questions` (their replies follow theirs)."""
    if (model_dir is None) == (upstream is None):
        raise ValueError("give exactly one of model_dir or upstream")
    if not calibrations:
        return []
    first, *then = calibrations
    if any(c is None for c in then):
        raise ValueError("only the first pass may be served without a calibration document")
    settings = _settings(model_dir, upstream, upstream_model, first)
    return asyncio.run(_ask(settings, questions, max_tokens, temperature, concurrency,
                            [c for c in then if c is not None], mc_questions))


def served_raw(reply: Reply, method: str) -> float | None:
    """The raw confidence the server served for `reply` when `method` scored it, else None."""
    if reply.confidence.get("method") != method:
        return None
    value = float(reply.confidence["raw"])
    return value if math.isfinite(value) else 0.0


def method_raw(reply: Reply, method: str, q: float) -> float:
    """`method`'s raw confidence of a reply. Token statistics: the served raw when the server
    scored it by that method (checked against the recomputation), else recomputed from the
    returned logprobs. `verify` / `consistency`: the served raw (`ServeFitError` when that
    method did not serve the reply: it cannot be recomputed)."""
    if confidence_method(method).needs_upstream:
        served_extra = served_raw(reply, method)
        if served_extra is None:
            raise ServeFitError(f"the reply was served by {reply.confidence.get('method')!r}, "
                                f"not {method!r}: its {method} confidence is unknown")
        return served_extra
    value = confidence_score(reply.logprobs or {"content": []}, method, q=q)
    value = 0.0 if not math.isfinite(value) else value
    if reply.confidence.get("method") == method:
        served = float(reply.confidence["raw"])
        if abs(served - value) > RAW_TOLERANCE:
            raise ServeFitError(
                f"served raw {method} confidence {served!r} differs from its recomputation "
                f"{value!r}: the fit would not be what is served"
            )
        return served
    return value


@dataclass
class FreeFormFit:
    """The fitted entries, the chosen `free_form` method and the numbers to report."""

    methods: dict[str, MethodCalibration]
    free_form: str
    report: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    # `no_letter`'s entry and report (`fit_no_letter`), when multiple-choice items were served.
    no_letter: tuple[MethodCalibration, dict[str, Any]] | None = None


@dataclass(frozen=True)
class _Sample:
    """One method's (raw, right) pairs on one split, and the replies it did not serve."""

    raw: np.ndarray
    correct: np.ndarray
    not_served: dict[str, int]  # served-by method -> replies left out (extra-work methods)
    questions: list[str] | None = None  # each pair's question: the calibrator's folds group by it

    def note(self, method: str) -> str | None:
        if not self.not_served:
            return None
        parts = ", ".join(f"{n} by {m}" for m, n in sorted(self.not_served.items()))
        return (f"{method} is fitted on the {self.raw.size} replies it served; not served by it: "
                f"{parts} (answer: an option letter; mean: the fallback when the extra request "
                "gave no verdict or failed)")


def _graded(replies: Sequence[Reply], items: Sequence[Mapping[str, Any]], grader: Grader
            ) -> np.ndarray:
    return np.asarray([bool(grader(r.text, str(it["answer"]), list(it.get("aliases", []))))
                       for r, it in zip(replies, items, strict=True)], dtype=bool)


def _sample(items: Sequence[Mapping[str, Any]], replies: Sequence[Reply], method: str,
            grader: Grader, q: float) -> _Sample:
    correct = _graded(replies, items, grader)
    if not confidence_method(method).needs_upstream:
        raw = np.asarray([method_raw(r, method, q) for r in replies], dtype=np.float64)
        return _Sample(raw, correct, {}, [str(it["question"]) for it in items])
    values = [served_raw(r, method) for r in replies]
    keep = np.asarray([v is not None for v in values], dtype=bool)
    not_served: dict[str, int] = {}
    for r, v in zip(replies, values, strict=True):
        if v is None:
            by = str(r.confidence.get("method"))
            not_served[by] = not_served.get(by, 0) + 1
    raw = np.asarray([v for v in values if v is not None], dtype=np.float64)
    questions = [str(it["question"]) for it, k in zip(items, keep, strict=True) if k]
    return _Sample(raw, correct[keep], not_served, questions)


def _method_fit(sample: _Sample, kind: str, targets: Sequence[float], params: MethodParams,
                method: str, n_bins: int, seed: int,
                guarantees: GuaranteeTargets = NO_GUARANTEES) -> MethodCalibration:
    raw, correct = sample.raw, sample.correct
    families = None if kind == "auto" else [kind]
    notes = [n for n in [sample.note(method)] if n]
    try:
        choice = choose_calibrator(raw, correct, families=families, questions=sample.questions,
                                   n_bins=n_bins, seed=seed)
    except DegenerateDataError:  # no replies at all
        fit = None
        if notes:
            fit = FitMetrics(n=0, ece_raw=0.0, ece_calibrated=0.0, notes=notes)
        return MethodCalibration(params=params, fit=fit)
    calibrated = choice.apply(raw)
    fitted = choice.family != "identity"
    thresholds, unreachable = thresholds_for(calibrated, correct, targets) if fitted else ([], [])
    certified, uncertified = (certified_thresholds(calibrated, correct, guarantees) if fitted
                              else ([], []))
    notes += uncertified
    area = auroc(raw, correct)
    fit = FitMetrics(
        n=int(raw.size), ece_raw=ece(raw, correct, n_bins),
        ece_calibrated=ece(calibrated, correct, n_bins), accuracy=float(np.mean(correct)),
        auroc=area if math.isfinite(area) else None,
        unreachable_targets=unreachable or None, calibrator=choice.family,
        held_out_ece=dict(choice.held_out_ece) or None,
        held_out=choice.held_out_dict() or None, selection=choice.selection or None,
        notes=[*choice.notes, *notes] or None, labels="gold",  # graded replies
    )
    return MethodCalibration(
        params=params,
        calibrator=choice.calibrator.to_dict() if fitted else None,
        thresholds=[Threshold.model_validate(t) for t in thresholds],
        guarantees=certified,
        fit=fit,
    )


def _params(method: str, q: float, given: Mapping[str, MethodParams]) -> MethodParams:
    if method in given:
        return given[method]
    return MethodParams(quantile=q) if method == "quantile" else MethodParams()


def _report(samples: Mapping[str, _Sample], entries: Mapping[str, MethodCalibration],
            n_bins: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, sample in samples.items():
        raw, correct = sample.raw, sample.correct
        served = ServedMethod(method, entries[method].calibration_map())
        score = np.asarray([served.score(float(v)) for v in raw])
        out[method] = {
            "n": int(raw.size), "accuracy": float(np.mean(correct)) if raw.size else math.nan,
            "ece_raw": ece(raw, correct, n_bins) if raw.size else math.nan,
            "ece_calibrated": ece(score, correct, n_bins) if raw.size else math.nan,
            "auroc": auroc(raw, correct) if raw.size else math.nan,
            "mean_confidence": float(np.mean(score)) if raw.size else math.nan,
            "calibrated": served.calibrated,
        }
        if sample.not_served:
            out[method]["not_served"] = dict(sample.not_served)
    return out


Split = tuple[Sequence[Mapping[str, Any]], Sequence[Reply]]


def _present(methods: Sequence[str] | None, calibrate: Split,
             passes: Mapping[str, Sequence[Reply]]) -> tuple[str, ...]:
    """`methods`, or by default every token statistic plus each extra-work method that served
    some reply (in the main replies or a pass of its own)."""
    if methods is not None:
        return tuple(methods)
    served = {str(r.confidence.get("method")) for r in calibrate[1]} | set(passes)
    return (*TOKEN_FIT_METHODS,
            *(m for m in FREE_FORM_FIT_METHODS if m not in TOKEN_FIT_METHODS and m in served))


def fit_free_form(
    calibrate: Split,
    test: Split | None = None,
    *,
    grader: Grader = exact_match,
    kind: str = "auto",
    targets: Sequence[float] = DEFAULT_TARGET_ACCURACIES,
    methods: Sequence[str] | None = None,
    q: float = 0.1,
    n_bins: int = N_BINS,
    seed: int = 0,
    passes: Mapping[str, Split] | None = None,
    test_passes: Mapping[str, Split] | None = None,
    params: Mapping[str, MethodParams] | None = None,
    free_form: str | None = None,
    guarantees: GuaranteeTargets = NO_GUARANTEES,
) -> FreeFormFit:
    """One calibrator per method on (raw, graded) of the calibrate replies; `free_form` the
    fitted method of highest AUROC (or the one forced); per-method report on both splits.

    `calibrate` / `test` are (items, replies) of the main serving pass: the token statistics are
    recomputed from its logprobs, and an extra-work method reads the raws it served there.
    `passes` / `test_passes` give a method the (items, replies) of its own serving pass instead
    (consistency: a document serving it). `methods` None: the token statistics plus each
    extra-work method that served something. `params`: a method's parameters to record (the
    verify question, consistency's k)."""
    if kind == "option_temperature":
        raise ValueError("option_temperature is the option-letter method's; use auto or a "
                         "scalar family for the free-form methods")
    passes = dict(passes or {})
    methods = _present(methods, calibrate, {m: r for m, (_, r) in passes.items()})
    unknown = [m for m in methods if m not in FREE_FORM_FIT_METHODS]
    if unknown:
        raise ValueError(f"cannot fit {', '.join(unknown)}; free-form methods: "
                         f"{', '.join(FREE_FORM_FIT_METHODS)}")
    if free_form is not None and free_form not in methods:
        raise ValueError(f"free_form {free_form!r} is not among the fitted methods "
                         f"({', '.join(methods)})")
    given = dict(params or {})
    samples = {m: _sample(*passes.get(m, calibrate), m, grader, q) for m in methods}
    entries = {m: _method_fit(samples[m], kind, targets, _params(m, q, given), m, n_bins, seed,
                              guarantees) for m in methods}
    fitted = [m for m in methods if entries[m].calibrated]
    aucs = {m: auroc(samples[m].raw, samples[m].correct) if samples[m].raw.size else math.nan
            for m in methods}
    notes: list[str] = []
    correct = _graded(calibrate[1], calibrate[0], grader)
    if free_form is not None:
        chosen = free_form
        rule = "free_form = forced by the caller"
        if not entries[chosen].calibrated:
            notes.append(f"{chosen} (forced) has no calibrator: served calibrated: false")
    elif fitted:
        # An AUROC of one class (NaN) ranks nothing: counted as chance.
        chosen = max(fitted, key=lambda m: (aucs[m] if math.isfinite(aucs[m]) else 0.5,
                                            -methods.index(m)))
        rule = "free_form = the fitted method with the highest AUROC on the calibrate split"
    else:
        chosen = "mean" if "mean" in methods else methods[0]
        rule = "free_form = the fitted method with the highest AUROC on the calibrate split"
        notes.append(f"no free-form calibrator fitted ({int(correct.sum())} of {correct.size} "
                     f"short answers right): free-form replies are served calibrated: false")
    report: dict[str, Any] = {
        "rule": rule,
        "calibrate": {
            "n": int(correct.size),
            "served_by_answer": sum(r.confidence.get("method") == "answer"
                                    for r in calibrate[1]),
            "methods": _report(samples, entries, n_bins),
        },
    }
    if test is not None and len(test[0]):
        t_passes = dict(test_passes or {})
        t_samples = {m: _sample(*t_passes.get(m, test), m, grader, q) for m in methods}
        report["test"] = {
            "n": len(test[0]),
            "served_by_answer": sum(r.confidence.get("method") == "answer" for r in test[1]),
            "methods": _report(t_samples, entries, n_bins),
        }
    return FreeFormFit(entries, chosen, report, notes)


def _letterless(items: Sequence[Mapping[str, Any]], replies: Sequence[Reply]) -> _Sample:
    """(raw, right) of the replies the server scored by `no_letter`; right: the reply's leading
    letter is the gold one (`answers.option_letter`)."""
    raw: list[float] = []
    right: list[bool] = []
    questions: list[str] = []
    for item, reply in zip(items, replies, strict=True):
        value = served_raw(reply, NO_LETTER)
        if value is None:
            continue
        questions.append(str(item["question"]))
        recomputed = confidence_score(reply.logprobs or {"content": []}, NO_LETTER)
        if abs(value - (recomputed if math.isfinite(recomputed) else 0.0)) > RAW_TOLERANCE:
            raise ServeFitError(f"served raw {NO_LETTER} confidence {value!r} differs from its "
                                f"recomputation {recomputed!r}: the fit would not be what is "
                                "served")
        letters = LETTERS[: len(item["choices"])]
        raw.append(value)
        right.append(option_letter(reply.text, letters) == letters[int(item["answer"])])
    return _Sample(np.asarray(raw, dtype=np.float64), np.asarray(right, dtype=bool), {},
                   questions)


def fit_no_letter(
    calibrate: Split,
    test: Split | None = None,
    *,
    kind: str = "auto",
    targets: Sequence[float] = DEFAULT_TARGET_ACCURACIES,
    n_bins: int = N_BINS,
    seed: int = 0,
    guarantees: GuaranteeTargets = NO_GUARANTEES,
) -> tuple[MethodCalibration, dict[str, Any]]:
    """`no_letter`'s entry, fitted on the multiple-choice (items, replies) the server scored by
    it (module docstring), and its report: per split, the items asked, the replies without a
    letter (`n`), their accuracy, ECE raw and calibrated."""
    sample = _letterless(*calibrate)
    report: dict[str, Any] = {"calibrate": {"items": len(calibrate[0])}}
    if sample.raw.size < MIN_NO_LETTER:
        entry = MethodCalibration(params=MethodParams(), fit=FitMetrics(
            n=int(sample.raw.size), ece_raw=0.0, ece_calibrated=0.0,
            notes=[f"{sample.raw.size} of {len(calibrate[0])} multiple-choice replies named no "
                   f"option letter (fewer than {MIN_NO_LETTER}): no map, such replies are "
                   "served calibrated: false"]))
    else:
        entry = _method_fit(sample, kind, targets, MethodParams(), NO_LETTER, n_bins, seed,
                            guarantees)
    report["calibrate"].update(_report({NO_LETTER: sample}, {NO_LETTER: entry}, n_bins)[NO_LETTER])
    if test is not None and len(test[0]):
        held = _letterless(*test)
        report["test"] = {"items": len(test[0]),
                          **_report({NO_LETTER: held}, {NO_LETTER: entry}, n_bins)[NO_LETTER]}
    return entry, report


def with_no_letter(doc: CalibrationDocument, entry: MethodCalibration, report: Mapping[str, Any]
                   ) -> CalibrationDocument:
    """`doc` with the `no_letter` entry and `metrics.no_letter` (validated)."""
    data = doc.to_dict()
    data["methods"][NO_LETTER] = entry.model_dump(mode="json")
    data["metrics"] = {**data.get("metrics", {}), NO_LETTER: dict(report)}
    return CalibrationDocument.from_dict(_finite(data))


def with_free_form(doc: CalibrationDocument, fit: FreeFormFit) -> CalibrationDocument:
    """`doc` with the free-form entries, `free_form` and `metrics.short_answer` (validated).
    A method's parameters already in `doc` (a verify question, consistency's k) are kept
    where the fit set none."""
    data = doc.to_dict()
    for method, entry in fit.methods.items():
        new = entry.model_dump(mode="json")
        old = (data["methods"].get(method) or {}).get("params") or {}
        new["params"] = {**old, **new.get("params", {})}
        data["methods"][method] = new
    data["free_form"] = fit.free_form
    data["metrics"] = {**data.get("metrics", {}),
                       "short_answer": {**fit.report, "notes": fit.notes}}
    out = CalibrationDocument.from_dict(_finite(data))
    return out if fit.no_letter is None else with_no_letter(out, *fit.no_letter)


def _finite(value: Any) -> Any:
    """NaN (an AUROC of one class) as null: calibration.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def checkpoint_verdict_ids(model_dir: Path) -> dict[str, list[int]]:
    """The checkpoint tokenizer's yes and no token ids (`{"yes": [...], "no": [...]}`, either
    list may be empty): what verify's request asks the engine for (`verdict_token_ids`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = tokenizer.get_vocab()
    # Vocabulary entries are in the tokenizer's own spelling ("Ġyes", "▁no"); a candidate counts
    # only if its decoded text, which the engine returns in the logprobs, reads the same way.
    candidates = verdict_tokens(vocab)
    out: dict[str, list[int]] = {"yes": [], "no": []}
    for token in (*candidates.yes, *candidates.no):
        word = verdict_word(str(tokenizer.decode([vocab[token]])))
        if word is not None:
            out[word].append(vocab[token])
    return {side: sorted(ids) for side, ids in out.items()}


def checkpoint_verdict_tokens(model_dir: Path) -> VerdictTokens:
    """The yes and no tokens of the checkpoint's tokenizer, each as the engine prints it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = checkpoint_verdict_ids(model_dir)
    return verdict_tokens(str(tokenizer.decode([i])) for i in (*ids["yes"], *ids["no"]))


def _serving_document(doc: CalibrationDocument, method: str, params: MethodParams | None,
                      path: Path) -> Path:
    """`doc` serving `method` as `free_form` with no map of its own (its raw is served)."""
    data = doc.to_dict()
    entry = dict(data["methods"].get(method) or {})
    old = entry.get("params") or {}
    new = params.model_dump(mode="json") if params is not None else {}
    data["methods"][method] = {"params": {**old, **new}}
    data["free_form"] = method
    return CalibrationDocument.from_dict(data).write(path)


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
        docs = [(_serving_document(doc, first, params.get(first), work / f"{first}.json")
                 if first is not None else doc.write(work / "calibration.json"))]
        if "consistency" in methods:
            docs.append(_serving_document(doc, "consistency", params.get("consistency"),
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


def extra_request_notes(extra: Mapping[str, Mapping[str, int]]) -> list[str]:
    """What to say about extra requests that did not give their method's confidence (those
    replies were served by the `mean` fallback and are not in that method's fit)."""
    notes: list[str] = []
    for method, counts in extra.items():
        total = sum(counts.values())
        failed = {o: n for o, n in counts.items() if o != "ok" and n}
        if failed:
            parts = ", ".join(f"{n} {o}" for o, n in failed.items())
            notes.append(f"{method}: {total - counts.get('ok', 0)} of {total} extra requests "
                         f"gave no confidence ({parts}); those replies were served by mean")
    return notes


def check_verify(model_dir: Path) -> VerdictTokens:
    """`verify`'s yes/no tokens in the checkpoint's tokenizer; `ServeFitError` (`--verify`)
    when it lacks them."""
    found = checkpoint_verdict_tokens(model_dir)
    try:
        return require_verdict_tokens([*found.yes, *found.no])
    except NoVerdictTokensError as exc:
        raise ServeFitError(f"{model_dir}: {exc}; fit without it (--no-verify)",
                            "--verify") from None


def fit_methods(model_dir: Path, verify: bool | None, consistency: bool) -> tuple[
        tuple[str, ...], list[str]]:
    """The methods `calibserve calibrate` fits, and notes on what was left out and why:
    `verify` None fits verify when the tokenizer has yes/no tokens, True requires them."""
    methods = list(TOKEN_FIT_METHODS)
    notes: list[str] = []
    if verify is None:
        found = checkpoint_verdict_tokens(model_dir)
        if found.usable:
            methods.append("verify")
        else:
            try:
                require_verdict_tokens([*found.yes, *found.no])
            except NoVerdictTokensError as exc:
                notes.append(f"verify not fitted: {exc}")
    elif verify:
        check_verify(model_dir)
        methods.append("verify")
    if consistency:
        methods.append("consistency")
    return tuple(methods), notes


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


def mc_splits(data_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The multiple-choice items of `data_dir`'s calibrate and test splits (either may be
    empty), for `no_letter`."""
    from calibserve.merge.evaluate import load_mc_items

    return (load_mc_items(Path(data_dir) / "calibrate.jsonl"),
            load_mc_items(Path(data_dir) / "test.jsonl"))


def fit_written_model(model_dir: Path, data_dir: Path) -> CalibrationDocument:
    """`calibserve merge --free-form`: the written checkpoint's calibration.json (its
    multiple-choice fit) extended with the free-form methods fitted on `data_dir`'s short-answer
    items through a managed vLLM engine on `model_dir` (`serve_and_fit`; verify when the
    tokenizer has yes/no tokens); rewritten in place, atomically. The free-form methods are
    certified for the max_error targets (and delta) the multiple-choice method was certified
    for (`merge --max-error`); a served free-form method that cannot be is refused
    (InvalidConfig, `--max-error`) before the document is rewritten."""
    from calibserve.merge.errors import InvalidConfig
    from calibserve.merge.evaluate import short_answer_split

    path = Path(model_dir) / "calibration.json"
    doc = CalibrationDocument.load(path)
    certified = doc.method(doc.multiple_choice).guarantees
    guarantees = (GuaranteeTargets(tuple(sorted({g.max_error for g in certified})),
                                   certified[0].delta) if certified else NO_GUARANTEES)
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

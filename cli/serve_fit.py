"""Free-form calibrators fitted through the real serving path (`calibserve calibrate`).

The option-letter method is fitted offline on multiple-choice items (merge's evaluator). The
free-form methods score what the model actually generates, so their calibrators are fitted on
what calibserve actually serves: a real vLLM engine on the checkpoint (calibserve's managed
engine, or `upstream=` an engine already running), calibserve's own app in this process
(`server.app.create_app` over `httpx.ASGITransport`), each short-answer question sent as one plain
user chat message. For each reply:

- the served `choices[0].confidence.raw` is the raw confidence of the method that served it; the
  other token statistics are recomputed from the returned logprobs with calibration's own
  `confidence_score` (and the served one is checked against its recomputation);
- the reply is graded against the gold answer and its aliases (`answers.exact_match` by default,
  or any `Grader`: `--grader module:function`).

Every method in `FREE_FORM_FIT_METHODS` is then fitted on all graded replies with the family
choice of `calibration.choose_calibrator` (or one forced family), with escalation thresholds of its
own, into the document's `methods`. `free_form` is the fitted method with the highest AUROC (raw
confidence, right vs wrong, on the calibrate split; an undefined AUROC, one class only, counts as
0.5; ties: the earlier in the list); when no method could be fitted `free_form` stays `mean` with
no calibrator, served `calibrated: false`. Single-class data (every reply wrong) is fitted by
Platt's smoothed constant (`calibration.family`), so an always-wrong model is served ~0. A `test`
split of short answers is reported per method in `metrics.short_answer`.

The fit is over every reply, also those whose first token is an option letter (the server then
serves them with `answer`): the free-form methods' statistics are defined on every reply, and the
count of such replies is recorded (`metrics.short_answer.calibrate.served_by_answer`).

This module composes server and merge, so it lives in cli/ (merge must not import server).
"""

from __future__ import annotations

import asyncio
import importlib
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from calibserve.calibration import (
    N_BINS,
    CalibrationDocument,
    DegenerateDataError,
    FitMetrics,
    MethodCalibration,
    MethodParams,
    ServedMethod,
    Threshold,
    auroc,
    choose_calibrator,
    confidence_score,
    ece,
)
from calibserve.calibration.answers import Grader, exact_match
from calibserve.merge.calibrate import thresholds_for

__all__ = [
    "FREE_FORM_FIT_METHODS",
    "Reply",
    "ServeFitError",
    "ask_short_answers",
    "calibrate_with_serving",
    "fit_free_form",
    "load_grader",
    "method_raw",
    "with_free_form",
]

# The free-form methods fitted on short answers. A hook: `verify` (and `consistency`) join this
# list once the server's method registry serves them (their raw confidence is then read from the
# served `confidence.raw` of a request scored by that method instead of being recomputed).
FREE_FORM_FIT_METHODS: tuple[str, ...] = ("mean", "min", "first", "quantile")
SERVED_NAME = "calibserve-fit"
# Served and recomputed raw confidences must agree to float rounding.
RAW_TOLERANCE = 1e-9


class ServeFitError(RuntimeError):
    """The serving path did not give what the fit needs (a failed request, a raw that differs)."""


@dataclass(frozen=True)
class Reply:
    """One short-answer question as served: the reply text, `confidence`, `logprobs`."""

    text: str
    confidence: Mapping[str, Any]
    logprobs: Any


def load_grader(spec: str | None) -> Grader:
    """`module:function` -> that callable; None: `answers.exact_match`."""
    if not spec:
        return exact_match
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--grader must be module:function, got {spec!r}")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"--grader {spec!r}: {name!r} is not a callable of {module!r}")
    grader: Grader = fn
    return grader


def _settings(model_dir: Path | None, upstream: str | None, upstream_model: str | None,
              calibration: Path | None) -> Any:
    from calibserve.server.config import ModelSettings, ServerSettings

    source: dict[str, Any] = (
        {"upstreams": [upstream], "upstream_model": upstream_model}
        if upstream is not None else {"model": model_dir}
    )
    model = ModelSettings(name=SERVED_NAME, calibration=calibration, **source)
    return ServerSettings(models=[model], signing_key=secrets.token_hex(16), log_level="warning")


async def _ask(
    settings: Any, questions: Sequence[str], max_tokens: int, temperature: float,
    concurrency: int,
) -> list[Reply]:
    from calibserve.server.app import create_app
    from calibserve.server.runtime import ServerRuntime

    runtime = ServerRuntime(settings)
    await runtime.start()
    try:
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

            return list(await asyncio.gather(*(one(q) for q in questions)))
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
    if (model_dir is None) == (upstream is None):
        raise ValueError("give exactly one of model_dir or upstream")
    settings = _settings(model_dir, upstream, upstream_model, calibration)
    return asyncio.run(_ask(settings, questions, max_tokens, temperature, concurrency))


def method_raw(reply: Reply, method: str, q: float) -> float:
    """`method`'s raw confidence of a reply: the served raw when the server scored it by that
    method (checked against the recomputation), else recomputed from the returned logprobs."""
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


def _graded(replies: Sequence[Reply], items: Sequence[Mapping[str, Any]], grader: Grader
            ) -> np.ndarray:
    return np.asarray([bool(grader(r.text, str(it["answer"]), list(it.get("aliases", []))))
                       for r, it in zip(replies, items, strict=True)])


def _method_fit(raw: np.ndarray, correct: np.ndarray, kind: str, targets: Sequence[float],
                q: float, method: str, n_bins: int, seed: int) -> MethodCalibration:
    families = None if kind == "auto" else [kind]
    try:
        choice = choose_calibrator(raw, correct, families=families, n_bins=n_bins, seed=seed)
    except DegenerateDataError:  # no replies at all
        return MethodCalibration(params=_params(method, q))
    calibrated = choice.apply(raw)
    fitted = choice.family != "identity"
    thresholds, unreachable = thresholds_for(calibrated, correct, targets) if fitted else ([], [])
    fit = FitMetrics(
        n=int(raw.size), ece_raw=ece(raw, correct, n_bins),
        ece_calibrated=ece(calibrated, correct, n_bins), accuracy=float(np.mean(correct)),
        unreachable_targets=unreachable or None, calibrator=choice.family,
        held_out_ece=dict(choice.held_out_ece) or None, selection=choice.selection or None,
        notes=list(choice.notes) or None,
    )
    return MethodCalibration(
        params=_params(method, q),
        calibrator=choice.calibrator.to_dict() if fitted else None,
        thresholds=[Threshold.model_validate(t) for t in thresholds],
        fit=fit,
    )


def _params(method: str, q: float) -> MethodParams:
    return MethodParams(quantile=q) if method == "quantile" else MethodParams()


def _report(raws: Mapping[str, np.ndarray], correct: np.ndarray,
            entries: Mapping[str, MethodCalibration], n_bins: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, raw in raws.items():
        served = ServedMethod(method, entries[method].calibration_map())
        score = np.asarray([served.score(float(v)) for v in raw])
        out[method] = {
            "n": int(raw.size), "accuracy": float(np.mean(correct)) if raw.size else math.nan,
            "ece_raw": ece(raw, correct, n_bins), "ece_calibrated": ece(score, correct, n_bins),
            "auroc": auroc(raw, correct), "mean_confidence": float(np.mean(score)),
            "calibrated": served.calibrated,
        }
    return out


def fit_free_form(
    calibrate: tuple[Sequence[Mapping[str, Any]], Sequence[Reply]],
    test: tuple[Sequence[Mapping[str, Any]], Sequence[Reply]] | None = None,
    *,
    grader: Grader = exact_match,
    kind: str = "auto",
    targets: Sequence[float] = (0.7, 0.8, 0.9),
    methods: Sequence[str] = FREE_FORM_FIT_METHODS,
    q: float = 0.1,
    n_bins: int = N_BINS,
    seed: int = 0,
) -> FreeFormFit:
    """One calibrator per method on (raw, graded) of the calibrate replies; `free_form` the
    fitted method of highest AUROC; per-method report on both splits."""
    if kind == "option_temperature":
        raise ValueError("option_temperature is the option-letter method's; use auto or a "
                         "scalar family for the free-form methods")
    items, replies = calibrate
    correct = _graded(replies, items, grader)
    raws = {m: np.asarray([method_raw(r, m, q) for r in replies]) for m in methods}
    entries = {m: _method_fit(raws[m], correct, kind, targets, q, m, n_bins, seed)
               for m in methods}
    fitted = [m for m in methods if entries[m].calibrated]
    aucs = {m: auroc(raws[m], correct) for m in methods}
    notes: list[str] = []
    if fitted:
        # An AUROC of one class (NaN) ranks nothing: counted as chance.
        free_form = max(fitted, key=lambda m: (aucs[m] if math.isfinite(aucs[m]) else 0.5,
                                               -methods.index(m)))
    else:
        free_form = "mean" if "mean" in methods else methods[0]
        notes.append(f"no free-form calibrator fitted ({int(correct.sum())} of {correct.size} "
                     f"short answers right): free-form replies are served calibrated: false")
    report: dict[str, Any] = {
        "rule": "free_form = the fitted method with the highest AUROC on the calibrate split",
        "calibrate": {
            "n": int(correct.size),
            "served_by_answer": sum(r.confidence.get("method") == "answer" for r in replies),
            "methods": _report(raws, correct, entries, n_bins),
        },
    }
    if test is not None and len(test[0]):
        t_items, t_replies = test
        t_correct = _graded(t_replies, t_items, grader)
        t_raws = {m: np.asarray([method_raw(r, m, q) for r in t_replies]) for m in methods}
        report["test"] = {
            "n": int(t_correct.size),
            "served_by_answer": sum(r.confidence.get("method") == "answer" for r in t_replies),
            "methods": _report(t_raws, t_correct, entries, n_bins),
        }
    return FreeFormFit(entries, free_form, report, notes)


def with_free_form(doc: CalibrationDocument, fit: FreeFormFit) -> CalibrationDocument:
    """`doc` with the free-form entries, `free_form` and `metrics.short_answer` (validated)."""
    data = doc.to_dict()
    data["methods"].update({m: e.model_dump(mode="json") for m, e in fit.methods.items()})
    data["free_form"] = fit.free_form
    data["metrics"] = {**data.get("metrics", {}),
                       "short_answer": {**fit.report, "notes": fit.notes}}
    return CalibrationDocument.from_dict(_finite(data))


def _finite(value: Any) -> Any:
    """NaN (an AUROC of one class) as null: calibration.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value



def calibrate_with_serving(
    model_dir: Path,
    data_dir: Path,
    out_file: Path,
    calibrator: str = "auto",
    targets: Sequence[float] = (0.7, 0.8, 0.9),
    *,
    grader: Grader = exact_match,
    upstream: str | None = None,
    upstream_model: str | None = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    methods: Sequence[str] = FREE_FORM_FIT_METHODS,
    n_bins: int = N_BINS,
) -> CalibrationDocument:
    """`calibserve calibrate`: the option-letter method fitted on the multiple-choice items
    (`merge.calibrate_checkpoint`), then, when `data_dir` has short-answer items
    (`merge.evaluate.SHORT_ANSWER_FILES`), the free-form methods through the serving path. The
    document is written to `out_file` after each stage (atomically)."""
    from calibserve.merge.calibrate_checkpoint import calibrate_checkpoint
    from calibserve.merge.evaluate import short_answer_split

    mc_kind = calibrator
    doc = calibrate_checkpoint(model_dir, data_dir, out_file, mc_kind, targets, n_bins)
    short_cal = short_answer_split(data_dir, "calibrate")
    if not short_cal:
        return doc
    short_test = short_answer_split(data_dir, "test")
    # The answering server scores with the document just written: what will be served.
    replies = ask_short_answers(
        [str(it["question"]) for it in [*short_cal, *short_test]],
        model_dir=None if upstream is not None else model_dir, upstream=upstream,
        upstream_model=upstream_model, calibration=out_file, max_tokens=max_tokens,
        temperature=temperature,
    )
    kind = "auto" if calibrator == "option_temperature" else calibrator
    fit = fit_free_form(
        (short_cal, replies[: len(short_cal)]),
        (short_test, replies[len(short_cal):]) if short_test else None,
        grader=grader, kind=kind, targets=targets, methods=methods, q=doc.quantile(),
        n_bins=n_bins,
    )
    doc = with_free_form(doc, fit)
    doc.write(out_file)
    return doc

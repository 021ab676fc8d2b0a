"""Free-form calibrators through the serving path: reader, grader, fit, served reproduction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from calibserve.calibration import CalibrationDocument, ServedMethod, confidence_score
from calibserve.calibration.answers import exact_match
from calibserve.merge.errors import InvalidData
from calibserve.merge.evaluate import load_short_answers, short_answer_split
from calibserve.serve_fit import (
    FREE_FORM_FIT_METHODS,
    Reply,
    ServeFitError,
    fit_free_form,
    load_grader,
    method_raw,
    with_free_form,
)


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_short_answer_reader_and_splits(tmp_path: Path) -> None:
    mc = {"question": "q ?", "choices": ["a", "b"], "answer": 1}
    sa = {"question": "what is x ?", "answer": "gold", "aliases": ["golden"], "extra": 1}
    _write(tmp_path / "calibrate.jsonl", [mc, sa])
    _write(tmp_path / "short_calibrate.jsonl", [{"question": "y ?", "answer": "red"}])
    assert load_short_answers(tmp_path / "calibrate.jsonl") == [sa]
    got = short_answer_split(tmp_path, "calibrate")
    assert [it["answer"] for it in got] == ["red", "gold"]  # own file first, then mixed in
    assert short_answer_split(tmp_path, "test") == []
    _write(tmp_path / "bad.jsonl", [{"question": "z ?", "answer": "a", "aliases": "b"}])
    with pytest.raises(InvalidData, match="aliases"):
        load_short_answers(tmp_path / "bad.jsonl")
    _write(tmp_path / "bad2.jsonl", [{"question": "z ?", "answer": 3}])
    with pytest.raises(InvalidData, match="short-answer"):
        load_short_answers(tmp_path / "bad2.jsonl")


def first_word_grader(reply: str, gold: str, aliases: list[str] | tuple[str, ...] = ()) -> bool:
    """A user's own grader (for `--grader tests.test_serve_fit:first_word_grader`)."""
    return reply.split()[:1] == [gold]


def test_grader_default_and_pluggable() -> None:
    assert load_grader(None) is exact_match
    assert exact_match("The Gold.", "gold") and exact_match("golden", "gold", ["Golden"])
    assert not exact_match("", "gold")
    custom = load_grader("tests.test_serve_fit:first_word_grader")
    assert custom("gold bar", "gold", []) and not exact_match("gold bar", "gold")
    for bad in ("nocolon", "calibserve.calibration.answers:nope"):
        with pytest.raises(ValueError):
            load_grader(bad)


def _reply(text: str, lps: list[float], served_method: str = "mean", q: float = 0.1) -> Reply:
    content = [{"token": f"t{i}", "logprob": v, "top_logprobs": []} for i, v in enumerate(lps)]
    logprobs = {"content": content}
    raw = confidence_score(logprobs, served_method, q=q)
    return Reply(text, {"score": raw, "raw": raw, "method": served_method,
                        "calibrated": False}, logprobs)


def _data(n: int, seed: int = 0) -> tuple[list[dict[str, object]], list[Reply]]:
    # Right answers have high token probability, wrong ones low: every statistic ranks them.
    rng = np.random.default_rng(seed)
    items: list[dict[str, object]] = []
    replies: list[Reply] = []
    for _ in range(n):
        right = bool(rng.random() < 0.5)
        p = rng.uniform(0.5, 0.95) if right else rng.uniform(0.05, 0.6)
        lps = list(np.log(np.clip(rng.normal(p, 0.05, 3), 0.01, 1.0)))
        items.append({"question": "q ?", "answer": "gold"})
        replies.append(_reply("gold" if right else "blue", lps))
    return items, replies


def test_method_raw_uses_the_served_raw_and_checks_it() -> None:
    r = _reply("x", [-0.1, -2.0])
    assert method_raw(r, "mean", 0.1) == r.confidence["raw"]
    assert method_raw(r, "min", 0.1) == pytest.approx(math.exp(-2.0))
    forged = Reply("x", {**r.confidence, "raw": 0.99}, r.logprobs)
    with pytest.raises(ServeFitError):
        method_raw(forged, "mean", 0.1)


def _doc() -> CalibrationDocument:
    return CalibrationDocument.from_dict({"version": 2, "methods": {
        "answer": {"params": {"options": ["A", "B", "C", "D"], "temperature": 1.0}},
        "mean": {}}, "multiple_choice": "answer", "free_form": "mean"})


def test_fit_free_form_fits_every_method_and_the_scorer_reproduces_it() -> None:
    cal, test = _data(400, 0), _data(200, 1)
    fit = fit_free_form(cal, test)
    assert set(fit.methods) == set(FREE_FORM_FIT_METHODS)
    assert all(fit.methods[m].calibrated for m in FREE_FORM_FIT_METHODS)
    ranked = fit.report["calibrate"]["methods"]
    assert fit.free_form == max(FREE_FORM_FIT_METHODS, key=lambda m: ranked[m]["auroc"])
    doc = with_free_form(_doc(), fit)
    assert CalibrationDocument.from_dict(doc.to_dict()) == doc
    assert doc.free_form == fit.free_form and "short_answer" in doc.metrics
    for m in FREE_FORM_FIT_METHODS:
        entry = doc.method(m)
        assert entry.fit is not None and entry.fit.calibrator is not None
        assert entry.fit.held_out_ece and entry.fit.n == 400
        # What the document serves for a raw is exactly what was fitted.
        served = ServedMethod.from_document(doc, m)
        raws = np.asarray([method_raw(r, m, doc.quantile()) for r in cal[1]])
        fitted = np.asarray(entry.calibration_map().apply(raws))  # type: ignore[union-attr]
        assert np.allclose([served.score(float(v)) for v in raws], np.clip(fitted, 0, 1))
    held = fit.report["test"]["methods"][fit.free_form]
    assert held["ece_calibrated"] < held["ece_raw"] and held["auroc"] > 0.7


def test_fit_free_form_with_no_right_answer_serves_near_zero() -> None:
    items, replies = _data(50)
    wrong = [Reply("nope", r.confidence, r.logprobs) for r in replies]
    fit = fit_free_form((items, wrong))
    assert fit.free_form == "mean"  # no AUROC is defined: the first fitted method
    for entry in fit.methods.values():
        assert entry.calibrated and entry.fit is not None and entry.fit.calibrator == "platt"
        assert entry.fit.ece_calibrated < 0.05 < entry.fit.ece_raw
    doc = with_free_form(_doc(), fit)
    assert doc.metrics["short_answer"]["calibrate"]["methods"]["mean"]["auroc"] is None
    assert ServedMethod.from_document(doc, "mean").score(0.9) == pytest.approx(1 / 52)

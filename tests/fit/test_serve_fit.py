"""Free-form calibrators through the serving path: reader, grader, fit, served reproduction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from calibserve.calibration import CalibrationDocument, Scorer, ServedMethod, confidence_score
from calibserve.calibration.answers import exact_match
from calibserve.calibration.grading import load_grader
from calibserve.fit.document import with_free_form, with_no_letter
from calibserve.fit.errors import ServeFitError
from calibserve.fit.free_form import fit_free_form
from calibserve.fit.methods import FREE_FORM_FIT_METHODS, TOKEN_FIT_METHODS, fit_methods
from calibserve.fit.no_letter import MIN_NO_LETTER, fit_no_letter
from calibserve.fit.passes import Reply, extra_request_notes
from calibserve.fit.raw import method_raw
from calibserve.fit.verdict import checkpoint_verdict_ids, checkpoint_verdict_tokens
from calibserve.merge.errors import InvalidData
from calibserve.merge.evaluate import load_short_answers, short_answer_split


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
    """A user's own grader (for `--grader tests.fit.test_serve_fit:first_word_grader`)."""
    return reply.split()[:1] == [gold]


def test_grader_default_and_pluggable() -> None:
    assert load_grader(None) is exact_match
    assert exact_match("The Gold.", "gold") and exact_match("golden", "gold", ["Golden"])
    assert not exact_match("", "gold")
    custom = load_grader("tests.fit.test_serve_fit:first_word_grader")
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
    for i in range(n):
        right = bool(rng.random() < 0.5)
        p = rng.uniform(0.5, 0.95) if right else rng.uniform(0.05, 0.6)
        lps = list(np.log(np.clip(rng.normal(p, 0.05, 3), 0.01, 1.0)))
        # One question per item: the calibrator's folds group items by their question.
        items.append({"question": f"q{seed}-{i} ?", "answer": "gold"})
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
    # No reply was served by verify or consistency: by default only the token statistics.
    assert set(fit.methods) == set(TOKEN_FIT_METHODS)
    assert all(fit.methods[m].calibrated for m in TOKEN_FIT_METHODS)
    ranked = fit.report["calibrate"]["methods"]
    assert fit.free_form == max(TOKEN_FIT_METHODS, key=lambda m: ranked[m]["auroc"])
    doc = with_free_form(_doc(), fit)
    assert CalibrationDocument.from_dict(doc.to_dict()) == doc
    assert doc.free_form == fit.free_form and "short_answer" in doc.metrics
    for m in TOKEN_FIT_METHODS:
        entry = doc.method(m)
        assert entry.fit is not None and entry.fit.calibrator is not None
        assert entry.fit.held_out_ece and entry.fit.n == 400
        assert entry.fit.auroc == pytest.approx(ranked[m]["auroc"])
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


def _extra_reply(text: str, method: str, raw: float | None) -> Reply:
    """A reply as a document serving `method` (verify / consistency) serves it: `method` with
    its raw when the extra request worked, else the `mean` fallback (raw None) or `answer`."""
    lps = [-0.3, -0.2]
    fallback = confidence_score({"content": [{"token": "a", "logprob": v, "top_logprobs": []}
                                             for v in lps]}, "mean", q=0.1)
    served = method if raw is not None else "mean"
    value = raw if raw is not None else fallback
    return Reply(text, {"score": value, "raw": value, "method": served, "calibrated": False},
                 {"content": [{"token": f"t{i}", "logprob": v, "top_logprobs": []}
                              for i, v in enumerate(lps)]})


def _extra_data(n: int, method: str, seed: int, gap: float = 0.4
                ) -> tuple[list[dict[str, object]], list[Reply]]:
    # The extra method ranks right above wrong; every 7th reply got no verdict (fallback) and
    # every 11th was an option letter (served by answer).
    rng = np.random.default_rng(seed)
    items: list[dict[str, object]] = []
    replies: list[Reply] = []
    for i in range(n):
        right = bool(rng.random() < 0.5)
        p = float(np.clip(rng.normal(0.5 + (gap if right else -gap) / 2, 0.15), 0.0, 1.0))
        items.append({"question": f"q{seed}-{i} ?", "answer": "gold"})
        text = "gold" if right else "blue"
        if i % 11 == 0:
            r = _extra_reply(text, method, p)
            replies.append(Reply(text, {**r.confidence, "method": "answer"}, r.logprobs))
        else:
            replies.append(_extra_reply(text, method, None if i % 7 == 0 else p))
    return items, replies


def test_verify_and_consistency_are_fitted_on_the_replies_they_served() -> None:
    cal, test = _extra_data(400, "verify", 0), _extra_data(200, "verify", 1)
    c_cal, c_test = _extra_data(400, "consistency", 2), _extra_data(200, "consistency", 3)
    fit = fit_free_form(cal, test, passes={"consistency": c_cal},
                        test_passes={"consistency": c_test})
    assert set(fit.methods) == set(FREE_FORM_FIT_METHODS)  # both served something: both fitted
    served_by = {"verify": cal[1], "consistency": c_cal[1]}
    for method, replies in served_by.items():
        entry = fit.methods[method]
        n_served = sum(r.confidence["method"] == method for r in replies)
        assert entry.calibrated and entry.fit is not None and entry.fit.n == n_served < 400
        assert entry.fit.auroc is not None and entry.fit.auroc > 0.8
        assert entry.fit.ece_calibrated < entry.fit.ece_raw
        assert any("not served by it" in note for note in entry.fit.notes or [])
        assert entry.thresholds  # its own escalation thresholds
        row = fit.report["calibrate"]["methods"][method]
        assert row["not_served"] == {"answer": 37, "mean": sum(
            r.confidence["method"] == "mean" for r in replies)}
        held = fit.report["test"]["methods"][method]
        assert held["ece_calibrated"] < held["ece_raw"] and held["auroc"] > 0.8
        # The served map of the method reproduces the fit on exactly the raws it served.
        doc = with_free_form(_doc(), fit)
        raws = np.asarray([method_raw(r, method, 0.1) for r in replies
                           if r.confidence["method"] == method])
        served = ServedMethod.from_document(doc, method)
        fitted = doc.method(method).calibration_map()
        assert fitted is not None
        assert np.allclose([served.score(float(v)) for v in raws],
                           np.clip(fitted.apply(raws), 0, 1))
    # The extra methods rank right vs wrong far better than the flat token statistics.
    assert fit.free_form in ("verify", "consistency")
    with pytest.raises(ServeFitError, match="cannot be|unknown"):
        method_raw(cal[1][0], "verify", 0.1)  # served by answer: no verify confidence
    forced = fit_free_form(cal, methods=["mean", "verify"], free_form="mean")
    assert forced.free_form == "mean" and forced.report["rule"].endswith("caller")
    with pytest.raises(ValueError, match="not among"):
        fit_free_form(cal, methods=["mean"], free_form="verify")


def test_a_method_that_served_nothing_gets_no_calibrator_and_says_why() -> None:
    items, replies = _extra_data(40, "verify", 0)
    no_verdict = [Reply(r.text, {**r.confidence, "method": "mean",
                                 "raw": method_raw(r, "mean", 0.1),
                                 "score": method_raw(r, "mean", 0.1)}, r.logprobs)
                  for r in replies]
    fit = fit_free_form((items, no_verdict), methods=["mean", "verify"])
    entry = fit.methods["verify"]
    assert not entry.calibrated and entry.fit is not None and entry.fit.n == 0
    assert "40 by mean" in (entry.fit.notes or [""])[0]
    assert fit.free_form == "mean"
    doc = with_free_form(_doc(), fit)
    assert not ServedMethod.from_document(doc, "verify").calibrated  # served calibrated: false


def test_verify_needs_a_tokenizer_with_yes_and_no(tmp_path: Path) -> None:
    from calibserve.testing.checkpoints import make_tokenizer

    words = tmp_path / "words"  # a word-level vocabulary without yes/no: all map to <unk>
    make_tokenizer().save_pretrained(words)
    both = tmp_path / "both"
    make_tokenizer(("yes", "No")).save_pretrained(both)
    one = tmp_path / "one"
    make_tokenizer(("no",)).save_pretrained(one)  # one-sided: P(yes) would always be 0
    assert not checkpoint_verdict_tokens(words).usable
    found = checkpoint_verdict_tokens(both)
    assert found.yes == ("yes",) and found.no == ("No",)
    vocab = make_tokenizer(("yes", "No")).get_vocab()
    assert checkpoint_verdict_ids(both) == {"yes": [vocab["yes"]], "no": [vocab["No"]]}
    assert fit_methods(both, None, False)[0] == (*TOKEN_FIT_METHODS, "verify")
    for model in (words, one):
        methods, notes = fit_methods(model, None, True)
        assert methods == (*TOKEN_FIT_METHODS, "consistency")  # left out, with the reason
        assert "verify not fitted" in notes[0] and "yes" in notes[0]
        with pytest.raises(ServeFitError, match="no single token") as err:
            fit_methods(model, True, False)
        assert err.value.param == "--verify"
    assert fit_methods(both, False, False)[0] == TOKEN_FIT_METHODS


def test_extra_requests_that_gave_no_confidence_are_reported() -> None:
    extra = {"verify": {"ok": 8, "no_verdict": 3, "error": 1, "unsupported": 0},
             "consistency": {"ok": 5, "no_verdict": 0, "error": 0, "unsupported": 0}}
    (note,) = extra_request_notes(extra)
    assert note.startswith("verify: 4 of 12 extra requests gave no confidence")
    assert "3 no_verdict, 1 error" in note and "unsupported" not in note
    assert extra_request_notes({"verify": {"ok": 2}}) == []


# --- no_letter: replies to multiple-choice prompts that name no option ------------------------

def _mc_data(n: int, seed: int, letterless_every: int = 4
             ) -> tuple[list[dict[str, object]], list[Reply]]:
    """Multiple-choice items and replies as the server scored them: every `letterless_every`-th
    reply starts with a word (served by `no_letter`, wrong unless it names the gold letter
    first), the others with a letter (served by `answer`, not part of this fit)."""
    rng = np.random.default_rng(seed)
    items: list[dict[str, object]] = []
    replies: list[Reply] = []
    for i in range(n):
        items.append({"question": f"q{seed}-{i} ?", "choices": ["w", "x", "y", "z"], "answer": 1})
        lps = list(np.log(rng.uniform(0.3, 0.9, 4)))
        if i % letterless_every == 0:
            replies.append(_reply("The answer is x", lps, served_method="no_letter"))
        else:
            letter = _reply("B", lps[:1], served_method="mean")
            replies.append(Reply("B", {**letter.confidence, "method": "answer"}, letter.logprobs))
    return items, replies


def test_no_letter_is_fitted_on_letterless_replies_only_and_served_near_zero() -> None:
    cal, test = _mc_data(400, 0), _mc_data(200, 1)
    entry, report = fit_no_letter(cal, test)
    assert entry.calibrated and entry.fit is not None and entry.fit.n == 100
    assert entry.fit.accuracy == 0.0 and entry.fit.ece_calibrated < 0.05 < entry.fit.ece_raw
    assert report["calibrate"]["items"] == 400 and report["calibrate"]["n"] == 100
    assert report["test"]["n"] == 50 and report["test"]["ece_calibrated"] < 0.05
    doc = with_no_letter(_doc(), entry, report)
    assert CalibrationDocument.from_dict(doc.to_dict()) == doc
    assert doc.metrics["no_letter"]["test"]["items"] == 200
    # What the Scorer serves such a reply is this map: near 0, labelled calibrated.
    scorer = Scorer.from_document(doc)
    conf = scorer.score_choice(cal[1][0].logprobs, options_offered=True)
    assert (conf.method, conf.calibrated) == ("no_letter", True) and conf.score < 0.05


def test_no_letter_grades_the_leading_letter() -> None:
    items, replies = _mc_data(80, 0, letterless_every=1)
    # Half of them name the gold option after a bracket: right by `option_letter`.
    named = [Reply("(B) x", r.confidence, r.logprobs) if i % 2 else r
             for i, r in enumerate(replies)]
    entry, _ = fit_no_letter((items, named))
    assert entry.fit is not None and entry.fit.accuracy == pytest.approx(0.5)


def test_no_letter_needs_enough_replies_and_says_so() -> None:
    items, replies = _mc_data(40, 0, letterless_every=4)  # 10 letterless replies
    entry, report = fit_no_letter((items, replies))
    assert not entry.calibrated and entry.fit is not None and entry.fit.n == 10
    assert entry.fit.notes and str(MIN_NO_LETTER) in entry.fit.notes[0]
    assert report["calibrate"]["calibrated"] is False
    assert Scorer.from_document(with_no_letter(_doc(), entry, report)).score_choice(
        replies[0].logprobs, options_offered=True).calibrated is False


def test_a_forged_no_letter_raw_is_refused() -> None:
    items, replies = _mc_data(40, 0, letterless_every=1)
    forged = [Reply(r.text, {**r.confidence, "raw": 0.99}, r.logprobs) for r in replies]
    with pytest.raises(ServeFitError, match="no_letter"):
        fit_no_letter((items, forged))


def test_free_form_methods_are_certified_on_their_own_calibrated_confidence() -> None:
    from calibserve.calibration.certified import GuaranteeTargets, refusals
    from calibserve.calibration.guarantee import certify_threshold

    cal = _data(400, 0)
    fit = fit_free_form(cal, guarantees=GuaranteeTargets((0.3, 0.01), 0.1))
    doc = with_free_form(_doc(), fit)
    for m in TOKEN_FIT_METHODS:
        entry = doc.method(m)
        raws = np.asarray([method_raw(r, m, doc.quantile()) for r in cal[1]])
        correct = np.asarray([exact_match(r.text, str(it["answer"]), ())
                              for it, r in zip(*cal, strict=True)])
        calibrated = np.asarray(entry.calibration_map().apply(raws))  # type: ignore[union-attr]
        expected = certify_threshold(calibrated, correct, 0.3, 0.1)
        if expected.certified:
            (g,) = entry.guarantees
            assert (g.max_error, g.threshold, g.kept) == (0.3, expected.threshold, expected.kept)
        assert any(n.startswith("not certified: max_error 0.01:")
                   for n in entry.fit.notes or [])  # type: ignore[union-attr]
    # The served free-form method cannot promise 1% errors: refused with the figure.
    (why,) = refusals(doc, GuaranteeTargets((0.01,)))
    assert why.startswith(f"0.01 for method {doc.free_form!r}") and "at least" in why

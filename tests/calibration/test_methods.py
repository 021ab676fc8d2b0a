"""The confidence-method registry, the document's `verify` / `consistency` entries, and how the
Scorer serves a free-form method that needs extra upstream work."""

from __future__ import annotations

import math
from typing import Any

import pytest

from calibserve.calibration import (
    CONFIDENCE_METHODS,
    CalibrationDocument,
    CalibrationError,
    Scorer,
    confidence_method,
)
from calibserve.calibration.methods import EXTRA_WORK_METHODS, FREE_FORM_METHODS, TOKEN_METHODS

PLATT = {"type": "platt", "a": 2.0, "b": -1.0}


def doc(free_form: str, **methods: dict[str, Any]) -> CalibrationDocument:
    entries: dict[str, Any] = {"answer": {"calibrator": {"type": "temperature",
                                                         "temperature": 2.0}}}
    entries.update(methods)
    entries.setdefault(free_form, {})
    return CalibrationDocument.from_dict(
        {"version": 2, "methods": entries, "multiple_choice": "answer", "free_form": free_form}
    )


def free_form_reply(p: float = 0.5) -> dict[str, Any]:
    lp = math.log(p)
    return {"content": [{"token": " paris", "logprob": lp, "top_logprobs": []},
                        {"token": "<|end|>", "logprob": lp, "top_logprobs": []}]}


def letter_reply() -> dict[str, Any]:
    top = [{"token": "B", "logprob": math.log(0.8)}, {"token": "A", "logprob": math.log(0.2)}]
    return {"content": [{"token": "B", "logprob": math.log(0.8), "top_logprobs": top}]}


def test_registry_names_every_method_and_its_cost() -> None:
    assert CONFIDENCE_METHODS == ("mean", "min", "first", "quantile", "answer", "no_letter",
                                  "verify", "consistency")
    assert EXTRA_WORK_METHODS == ("verify", "consistency")
    assert set(TOKEN_METHODS) == {"mean", "min", "first", "quantile", "answer", "no_letter"}
    assert "answer" not in FREE_FORM_METHODS and "verify" in FREE_FORM_METHODS
    assert "no_letter" not in FREE_FORM_METHODS  # it scores replies to option prompts only
    assert confidence_method("verify").extra == "verify"
    assert confidence_method("consistency").extra == "sample"
    assert confidence_method("answer").top_logprobs >= 4
    assert not confidence_method("mean").needs_upstream
    with pytest.raises(CalibrationError, match="unknown method 'nope'.*consistency"):
        confidence_method("nope")


def test_document_accepts_verify_and_consistency_params() -> None:
    d = doc("verify", verify={"params": {"question": "Right? yes or no."}},
            consistency={"params": {"k": 8}})
    assert d.verify_question() == "Right? yes or no."
    assert d.consistency_k() == 8
    assert doc("consistency").consistency_k() == 5
    assert doc("verify").verify_question() is None
    assert doc("verify").verdict_token_ids() == ()
    ids = doc("verify", verify={"params": {"verdict_token_ids": {"yes": [7, 9], "no": [3]}}})
    assert ids.verdict_token_ids() == (7, 9, 3)
    assert Scorer.from_document(ids).verdict_token_ids == (7, 9, 3)
    assert CalibrationDocument.from_dict(d.to_dict()) == d


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ({"consistency": {"params": {"k": 1}}}, "methods.consistency.params.k"),
        ({"consistency": {"params": {"k": "5"}}}, "methods.consistency.params.k"),
        ({"mean": {"params": {"k": 3}}}, "k is a `consistency` parameter"),
        ({"mean": {"params": {"question": "q"}}}, "question and verdict_token_ids are `verify`"),
        ({"mean": {"params": {"verdict_token_ids": {"yes": [1], "no": [2]}}}},
         "question and verdict_token_ids are `verify`"),
        ({"verify": {"params": {"question": " "}}}, "methods.verify.params.question"),
        ({"verify": {"params": {"verdict_token_ids": {"yes": [1], "no": []}}}},
         "methods.verify.params.verdict_token_ids"),
        ({"verify": {"params": {"verdict_token_ids": {"yes": [1]}}}},
         "methods.verify.params.verdict_token_ids"),
    ],
)
def test_bad_method_params_are_refused(methods: dict[str, Any], message: str) -> None:
    with pytest.raises(CalibrationError, match=message):
        doc("verify", **methods)


def test_multiple_choice_cannot_need_extra_work() -> None:
    with pytest.raises(CalibrationError, match="multiple_choice: 'verify' needs extra"):
        CalibrationDocument.from_dict({"version": 2, "methods": {"verify": {}},
                                       "multiple_choice": "verify", "free_form": "verify"})


def test_free_form_reply_waits_for_extra_work_as_mean_with_means_own_map() -> None:
    scorer = Scorer.from_document(doc("verify", verify={"calibrator": PLATT}))
    conf = scorer.score_choice(free_form_reply(0.5))
    # verify's map is never applied to the fallback; mean has no map of its own here.
    assert (conf.method, conf.calibrated, conf.score) == ("mean", False, pytest.approx(0.5))
    kind = scorer.extra_work(conf)
    assert kind is not None and kind.name == "verify"
    refined = scorer.refined(0.9)
    assert (refined.method, refined.calibrated, refined.raw) == ("verify", True, 0.9)
    assert refined.score == scorer.free_form.score(0.9) != 0.9


def test_fallback_uses_means_own_calibrator_when_the_document_has_one() -> None:
    scorer = Scorer.from_document(doc("verify", mean={"calibrator": PLATT}))
    conf = scorer.score_choice(free_form_reply(0.5))
    assert (conf.method, conf.calibrated) == ("mean", True)
    refined = scorer.refined(0.7)
    assert (refined.method, refined.calibrated, refined.score) == ("verify", False, 0.7)


def test_option_letter_replies_and_token_methods_need_no_extra_work() -> None:
    scorer = Scorer.from_document(doc("verify"))
    assert scorer.extra_work(scorer.score_choice(letter_reply())) is None
    plain = Scorer.from_document(doc("mean"))
    assert plain.extra is None
    assert plain.extra_work(plain.score_choice(free_form_reply())) is None
    with pytest.raises(CalibrationError, match="needs no extra work"):
        plain.refined(0.5)


@pytest.mark.parametrize("free_form", ["verify", "consistency", "mean", "min", "quantile"])
def test_free_form_is_never_calibrated_without_its_own_calibrator(free_form: str) -> None:
    scorer = Scorer.from_document(doc(free_form))
    conf = scorer.score_choice(free_form_reply(0.3))
    assert conf.calibrated is False and conf.score == conf.raw
    if scorer.extra is not None:
        assert scorer.refined(0.4).calibrated is False


def test_stream_and_batch_agree_on_the_fallback() -> None:
    scorer = Scorer.from_document(doc("consistency"))
    s = scorer.stream()
    for entry in free_form_reply(0.4)["content"]:
        s.feed({"content": [entry]})
    assert s.confidence() == scorer.score_choice(free_form_reply(0.4))

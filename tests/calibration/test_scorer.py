"""Scorer: calibration.json in, Confidence(score, raw, method, calibrated) out, batch and stream."""

from __future__ import annotations

import math
from typing import Any

import pytest

from calibserve.calibration import CalibrationError, Scorer, TemperatureScaling

CONFIG: dict[str, Any] = {
    "version": 1,
    "confidence": {
        "method": "answer",
        "options": ["A", "B", "C", "D"],
        "temperature": 1.0,
        "fallback": "mean",
    },
    "calibrator": {"type": "temperature", "temperature": 1.7},
    "thresholds": [{"target_accuracy": 0.8, "threshold": 0.63, "coverage": 0.55}],
}


def mc_reply(letter: str, p: float) -> dict[str, Any]:
    top = [{"token": letter, "logprob": math.log(p)}, {"token": "Z", "logprob": math.log(0.05)}]
    other = "A" if letter != "A" else "B"
    top.append({"token": other, "logprob": math.log(1 - p - 0.05)})
    return {
        "content": [
            {"token": letter, "logprob": math.log(p), "top_logprobs": top},
            {"token": "<|end|>", "logprob": -0.01, "top_logprobs": []},
        ]
    }


def test_answer_method_with_temperature_calibrator() -> None:
    scorer = Scorer.from_config(CONFIG)
    conf = scorer.score_choice(mc_reply("B", 0.8))
    raw = 0.8 / 0.95
    assert conf.method == "answer"
    assert conf.raw == pytest.approx(raw)
    assert conf.score == pytest.approx(TemperatureScaling(1.7).apply(raw))
    assert conf.score < conf.raw  # T > 1 softens
    assert conf.to_dict() == {
        "score": conf.score, "raw": conf.raw, "method": "answer", "calibrated": True
    }


def test_fallback_for_free_form_reply() -> None:
    scorer = Scorer.from_config(CONFIG)
    reply = {
        "content": [
            {
                "token": "The",
                "logprob": -0.5,
                "top_logprobs": [
                    {"token": "The", "logprob": -0.5},
                    {"token": "It", "logprob": -1.5},
                ],
            },
            {"token": " end", "logprob": -1.5, "top_logprobs": []},
        ]
    }
    conf = scorer.score_choice(reply)
    assert conf.method == "mean"
    assert conf.raw == pytest.approx(math.exp(-1.0))
    # The temperature map was fitted on `answer` scores: `mean` has none of its own.
    assert conf.score == conf.raw and not conf.calibrated


def test_no_config_is_mean_and_identity() -> None:
    scorer = Scorer.from_config(None)
    conf = scorer.score_choice(
        {"tokens": ["a", "b"], "token_logprobs": [-0.2, -0.4], "top_logprobs": None}
    )
    assert conf.method == "mean"
    assert conf.raw == pytest.approx(math.exp(-0.3))
    assert conf.score == conf.raw and not conf.calibrated  # identity calibrator
    empty = scorer.score_choice(None)
    assert (empty.score, empty.raw, empty.method, empty.calibrated) == (0.0, 0.0, "mean", False)


def test_stream_equals_batch_including_fallback() -> None:
    scorer = Scorer.from_config(CONFIG)
    for reply in (
        mc_reply("C", 0.6),
        {
            "content": [
                {"token": "Hi", "logprob": -0.7, "top_logprobs": []},
                {"token": "!", "logprob": -9999.0, "top_logprobs": []},
            ]
        },
    ):
        stream = scorer.stream()
        for entry in reply["content"]:
            stream.feed([entry])
        assert stream.confidence() == scorer.score_choice(reply)
        assert stream.score == scorer.score_choice(reply).score


@pytest.mark.parametrize(
    "bad",
    [
        {"version": 2},
        {"version": 3},
        {"confidence": {"method": "vibes"}},
        {"confidence": {"method": "answer", "fallback": "answer"}},
        {"confidence": {"temperature": 0}},
        {"calibrator": {"type": "unknown"}},
        {"confidence": "answer"},
    ],
)
def test_bad_config(bad: dict[str, Any]) -> None:
    with pytest.raises(CalibrationError):
        Scorer.from_config(bad)


def test_quantile_method_from_config() -> None:
    scorer = Scorer.from_config({"confidence": {"method": "quantile", "quantile": 0.0}})
    conf = scorer.score_choice([-0.1, -2.0, -0.2])
    assert conf.method == "quantile"
    assert conf.raw == pytest.approx(math.exp(-2.0))


FREE_FORM = {"content": [{"token": "The", "logprob": -0.5, "top_logprobs": []},
                         {"token": " end", "logprob": -1.5, "top_logprobs": []}]}
V2 = {"version": 2, "multiple_choice": "answer", "free_form": "mean", "methods": {
    "answer": {"calibrator": {"type": "temperature", "temperature": 1.7}},
    "mean": {"calibrator": {"type": "temperature", "temperature": 2.0}},
    "no_letter": {"calibrator": {"type": "platt", "a": 0.0, "b": -4.0}}}}


@pytest.mark.parametrize(("offered", "letter", "free"), [
    (True, "answer", "no_letter"),  # an option prompt: a word first is a non-answer
    (False, "mean", "mean"),  # no options: the free-form method, whatever the first token
    (None, "answer", "mean"),  # unknown prompt (token ids): the reply alone decides
])
def test_the_prompt_decides_the_method(offered: bool | None, letter: str, free: str) -> None:
    scorer = Scorer.from_config(V2)
    mc = scorer.score_choice(mc_reply("B", 0.8), options_offered=offered)
    ff = scorer.score_choice(FREE_FORM, options_offered=offered)
    assert (mc.method, ff.method) == (letter, free)
    assert mc.calibrated and ff.calibrated  # each through its own map
    stream = scorer.stream(offered)
    stream.feed(FREE_FORM)
    assert stream.confidence() == ff  # streamed and batch agree


def test_no_letter_is_served_by_its_own_map_or_none() -> None:
    scorer = Scorer.from_config(V2)
    conf = scorer.score_choice(FREE_FORM, options_offered=True)
    assert conf.raw == pytest.approx(math.exp(-1.0))  # the mean statistic
    assert conf.score == pytest.approx(1 / (1 + math.exp(4.0)))  # platt(a=0, b=-4)
    without = {**V2, "methods": {k: v for k, v in V2["methods"].items() if k != "no_letter"}}
    bare = Scorer.from_config(without).score_choice(FREE_FORM, options_offered=True)
    # Never the free-form map (fitted on short answers) nor the option-letter one.
    assert (bare.method, bare.calibrated, bare.score) == ("no_letter", False, bare.raw)


def test_no_letter_cannot_be_the_multiple_choice_method() -> None:
    bad = {**V2, "multiple_choice": "no_letter"}
    with pytest.raises(CalibrationError, match="multiple_choice"):
        Scorer.from_config(bad)
    with pytest.raises(CalibrationError, match="free_form"):
        Scorer.from_config({**V2, "free_form": "no_letter"})

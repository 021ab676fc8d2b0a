"""Parsing OpenAI logprob shapes, raw confidence methods, answer confidence and streaming."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibserve.calibration import (
    CalibrationError,
    NoOptionTokensError,
    StreamingConfidence,
    answer_confidence,
    confidence_score,
    token_logprobs,
)


def chat(entries: list[tuple[str, float | None, dict[str, float | None]]]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": tok,
                "logprob": lp,
                "bytes": list(tok.encode()),
                "top_logprobs": [{"token": t, "logprob": v} for t, v in top.items()],
            }
            for tok, lp, top in entries
        ]
    }


def test_parses_chat_logprobs() -> None:
    parsed = token_logprobs(chat([(" B", -0.2, {" B": -0.2, " A": -2.0}), ("!", -1.0, {})]))
    assert parsed.tokens == [" B", "!"]
    np.testing.assert_allclose(parsed.logprobs, [-0.2, -1.0])
    assert parsed.top[0] == {" B": -0.2, " A": -2.0}
    assert parsed.top[1] == {}


def test_parses_completions_logprobs() -> None:
    obj = {
        "tokens": ["A", " is"],
        "token_logprobs": [-0.1, None],
        "top_logprobs": [{"A": -0.1, "B": -2.5}, None],
        "text_offset": [0, 1],
    }
    parsed = token_logprobs(obj)
    assert parsed.tokens == ["A", " is"]
    assert parsed.logprobs[0] == -0.1 and math.isnan(parsed.logprobs[1])
    assert parsed.top == [{"A": -0.1, "B": -2.5}, {}]
    assert len(token_logprobs({"tokens": ["x"], "token_logprobs": [-1], "top_logprobs": None})) == 1


@pytest.mark.parametrize(
    "empty",
    [
        None,
        [],
        {},
        {"content": None},
        {"content": []},
        {"tokens": [], "token_logprobs": [], "top_logprobs": None},
    ],
)
def test_empty_output_scores_zero(empty: Any) -> None:
    assert len(token_logprobs(empty)) == 0
    for method in ("mean", "min", "first", "quantile"):
        assert confidence_score(empty, method) == 0.0
    with pytest.raises(NoOptionTokensError):
        confidence_score(empty, "answer")


def test_nulls_are_skipped_and_floor_is_zero_probability() -> None:
    assert confidence_score([None, -0.5, None], "mean") == pytest.approx(math.exp(-0.5))
    assert confidence_score([None, -0.5], "first") == pytest.approx(math.exp(-0.5))
    assert confidence_score([-0.1, -9999.0], "mean") == 0.0
    assert confidence_score([-0.1, -9999.0], "min") == 0.0
    # Probabilities [0.905, 0]: the 0.1-quantile interpolates 10% of the way up from 0.
    assert confidence_score([-0.1, -1e5], "quantile") == pytest.approx(0.1 * math.exp(-0.1))
    assert confidence_score([None, None], "mean") == 0.0
    # Tiny positive logprobs from rounding are probability 1, not more.
    assert confidence_score([1e-9], "mean") == 1.0


def test_methods_by_hand() -> None:
    lps = [-0.1, -2.0, -0.5, -0.3]
    assert confidence_score(lps, "mean") == pytest.approx(math.exp(np.mean(lps)))
    assert confidence_score(lps, "min") == pytest.approx(math.exp(-2.0))
    assert confidence_score(lps, "first") == pytest.approx(math.exp(-0.1))
    assert confidence_score(lps, "quantile", q=0.0) == pytest.approx(math.exp(-2.0))
    assert confidence_score(lps, "quantile", q=0.5) == pytest.approx(np.quantile(np.exp(lps), 0.5))
    with pytest.raises(CalibrationError, match="valid methods"):
        confidence_score(lps, "median")


def test_rejects_garbage() -> None:
    with pytest.raises(CalibrationError):
        token_logprobs("not logprobs")
    with pytest.raises(CalibrationError):
        token_logprobs({"unexpected": 1})
    with pytest.raises(CalibrationError):
        token_logprobs(["x"])


def test_answer_confidence_normalises_tokens() -> None:
    top = {"\u2581A": math.log(0.5), " B": math.log(0.3), "\u0120C": math.log(0.1), "x": -0.1}
    assert answer_confidence(top, "A") == pytest.approx(0.5 / 0.9)
    assert answer_confidence(top, " B") == pytest.approx(0.3 / 0.9)
    assert answer_confidence(top, None) == pytest.approx(0.5 / 0.9)  # argmax
    assert answer_confidence(top, "D") == 0.0  # an option, but absent from top


def test_answer_confidence_temperature_and_duplicates() -> None:
    top = {"A": math.log(0.6), "B": math.log(0.2)}
    t = 2.0
    expected = 0.6 ** (1 / t) / (0.6 ** (1 / t) + 0.2 ** (1 / t))
    assert answer_confidence(top, "A", temperature=t) == pytest.approx(expected)
    # " A" and "A" name the same option: their probabilities add.
    dup = {"A": math.log(0.3), " A": math.log(0.3), "B": math.log(0.2)}
    assert answer_confidence(dup, "A") == pytest.approx(0.75)
    with pytest.raises(CalibrationError):
        answer_confidence(top, "A", temperature=0.0)


def test_answer_confidence_without_options() -> None:
    with pytest.raises(NoOptionTokensError):
        answer_confidence({"The": -0.1, "It": -2.0}, None)
    with pytest.raises(NoOptionTokensError):
        answer_confidence({"A": -9999.0, "B": None}, None)  # type: ignore[dict-item]
    with pytest.raises(NoOptionTokensError, match="not one of the options"):
        answer_confidence({"A": -0.1, "The": -1.0}, "The")
    assert answer_confidence({"A": -9999.0, "B": -0.5}, None) == 1.0


def test_answer_method_uses_chosen_token_even_if_not_in_top() -> None:
    lp = chat([("C", math.log(0.2), {"A": math.log(0.6), "B": math.log(0.2)})])
    assert confidence_score(lp, "answer") == pytest.approx(0.2)
    custom = chat([("yes", math.log(0.7), {"yes": math.log(0.7), "no": math.log(0.1)})])
    assert confidence_score(custom, "answer", options=("yes", "no")) == pytest.approx(0.875)


logprob_values = st.one_of(
    st.none(),
    st.just(-9999.0),
    st.floats(-30.0, 0.0, allow_nan=False),
)
token_entries = st.lists(
    st.tuples(
        st.sampled_from(["A", " B", "\u2581C", "D", "the", "!"]),
        logprob_values,
        st.dictionaries(st.sampled_from(["A", " B", "C", "x"]), logprob_values, max_size=4),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(
    token_entries,
    st.lists(st.integers(0, 25), max_size=5),
    st.sampled_from(["mean", "min", "first", "quantile", "answer"]),
)
def test_streaming_equals_batch(
    entries: list[tuple[str, float | None, dict[str, float | None]]],
    cuts: list[int],
    method: str,
) -> None:
    whole = chat(entries)["content"]
    bounds = sorted({0, len(whole), *(c for c in cuts if c <= len(whole))})
    stream = StreamingConfidence(method)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        # Alternate the two chat stream shapes: the logprobs object and its content list.
        chunk = whole[lo:hi]
        stream.feed({"content": chunk} if lo % 2 else chunk)
    stream.feed(None)  # a chunk without logprobs (e.g. the finish chunk)
    try:
        batch = confidence_score({"content": whole}, method)
    except NoOptionTokensError:
        with pytest.raises(NoOptionTokensError):
            _ = stream.score
        return
    assert stream.score == batch  # exact, not approximate
    assert 0.0 <= batch <= 1.0


def test_streaming_reads_any_time() -> None:
    stream = StreamingConfidence("mean")
    assert stream.score == 0.0
    stream.feed({"tokens": ["a"], "token_logprobs": [-1.0], "top_logprobs": None})
    assert stream.score == pytest.approx(math.exp(-1.0))
    stream.feed([-3.0])
    assert stream.score == pytest.approx(math.exp(-2.0))
    assert stream.n_tokens == 2

"""`verify` (P(True)) and `consistency` confidences on hand-built logprobs and samples."""

from __future__ import annotations

import math

import pytest

from calibserve.calibration.consistency import consistency_confidence
from calibserve.calibration.errors import DegenerateDataError
from calibserve.calibration.verify import (
    VERIFY_QUESTION,
    NoVerdictError,
    NoVerdictTokensError,
    require_verdict_tokens,
    verdict_tokens,
    verify_confidence,
    verify_messages,
    verify_prompt,
)


def test_p_yes_is_renormalised_over_yes_and_no() -> None:
    top = {"yes": math.log(0.3), "no": math.log(0.1), "maybe": math.log(0.5)}
    assert verify_confidence(top) == pytest.approx(0.75)


def test_spellings_of_yes_add_up_and_prefixes_are_stripped() -> None:
    top = {"Ġyes": math.log(0.2), "Yes": math.log(0.2), "▁No": math.log(0.1), "x": -0.1}
    assert verify_confidence(top) == pytest.approx(0.8)


def test_one_sided_and_missing_verdicts() -> None:
    assert verify_confidence({"yes": -0.5, "the": -1.0}) == 1.0
    assert verify_confidence({"no": -0.5, "yes": -9999.0}) == 0.0  # vLLM's floor is p = 0
    with pytest.raises(NoVerdictError):
        verify_confidence({"the": -0.1, "yes": None})


def test_verify_requests_extend_the_original_prompt() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q?"}]
    out = verify_messages(messages, "paris")
    assert out[:2] == messages and out[2] == {"role": "assistant", "content": "paris"}
    assert out[3] == {"role": "user", "content": VERIFY_QUESTION}
    assert verify_prompt("Q: capital?\nA:", " paris").startswith("Q: capital?\nA: paris\n")


def test_consistency_counts_normalised_agreement() -> None:
    assert consistency_confidence("The Lake.", ["lake", "a lake", "hill", "LAKE!"]) == 0.75
    assert consistency_confidence("x", ["y"]) == 0.0
    with pytest.raises(DegenerateDataError):
        consistency_confidence("x", [])


def test_verdict_tokens_of_a_vocabulary() -> None:
    bpe = ["Ġyes", "ĠNo", "▁true", "false", "yesterday", "Ġnot", "y", "es"]
    found = verdict_tokens(bpe)
    assert found.yes == ("Ġyes", "▁true") and found.no == ("false", "ĠNo") and found.usable
    assert require_verdict_tokens(bpe) == found
    for vocab, missing in ((["<unk>", "the", "y", "es"], "yes and no"),
                           (["the", " no"], "yes"), (["Yes"], "no")):
        assert not verdict_tokens(vocab).usable
        with pytest.raises(NoVerdictTokensError, match=f"no single token for {missing} "):
            require_verdict_tokens(vocab)

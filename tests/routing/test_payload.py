"""What a tier's upstream is asked for: only the logprobs its confidence methods read."""

from __future__ import annotations

import pytest

from calibserve.calibration import CalibrationDocument, Scorer
from calibserve.routing.payload import MIN_TOP_LOGPROBS, tier_body, tier_top_logprobs

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def scorer(multiple_choice: str, free_form: str) -> Scorer:
    methods: dict[str, dict[str, object]] = {multiple_choice: {}, free_form: {}}
    return Scorer.from_document(CalibrationDocument.from_dict({
        "version": 2, "methods": methods, "multiple_choice": multiple_choice,
        "free_form": free_form}))


@pytest.mark.parametrize(("multiple_choice", "free_form", "top"), [
    ("answer", "mean", 5),  # the first token's alternatives (option letters)
    ("mean", "mean", 0),  # token statistics: the sampled tokens' own logprobs
    ("min", "quantile", 0),
    ("mean", "verify", 0),  # verify's main request: only what its fallback (mean) reads
    ("answer", "verify", 5),
])
def test_the_upstream_is_asked_only_for_what_the_methods_read(
        multiple_choice: str, free_form: str, top: int) -> None:
    assert tier_top_logprobs(scorer(multiple_choice, free_form)) == top
    sent = tier_body("chat", CHAT, "up", stream=False, top_logprobs=top)
    assert sent["logprobs"] is True and sent["top_logprobs"] == top
    sent = tier_body("completions", {"model": "m", "prompt": "p"}, "up", stream=False,
                     top_logprobs=top)
    assert sent["logprobs"] == top


def test_never_fewer_than_the_client_asked_for() -> None:
    sent = tier_body("chat", {**CHAT, "logprobs": True, "top_logprobs": 7}, "up", stream=True,
                     top_logprobs=0)
    assert sent["top_logprobs"] == 7 and sent["stream"] is True
    sent = tier_body("completions", {"model": "m", "prompt": "p", "logprobs": 3}, "up",
                     stream=False, top_logprobs=0)
    assert sent["logprobs"] == 3


def test_a_scorer_that_does_not_name_its_methods_gets_the_safe_default() -> None:
    assert tier_top_logprobs(object()) == MIN_TOP_LOGPROBS
    assert tier_body("chat", CHAT, "up", stream=False)["top_logprobs"] == MIN_TOP_LOGPROBS

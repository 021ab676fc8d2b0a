"""Parsing the engine's logprobs: the fast path for ordinary floats gives exactly what
`clean_logprob` gives for every value, in both response shapes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from calibserve.calibration.logprobs import LOGPROB_FLOOR, clean_logprob, parse_logprobs

VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, LOGPROB_FLOOR, math.nextafter(LOGPROB_FLOOR, 0.0), -1e-300,
                     1.5, None, True, -3]),
)


def same(a: np.ndarray, b: list[float]) -> bool:
    return all((x != x and y != y) or (x == y and math.copysign(1, x) == math.copysign(1, y))
               for x, y in zip(a.tolist(), b, strict=True))


@given(st.lists(VALUES, max_size=20))
def test_every_value_parses_as_clean_logprob(values: list[Any]) -> None:
    expected = [clean_logprob(v) for v in values]
    chat = parse_logprobs({"content": [{"token": "t", "logprob": v, "top_logprobs": []}
                                       for v in values]}, 1)
    completions = parse_logprobs({"tokens": ["t"] * len(values), "token_logprobs": values}, 1)
    assert same(chat.logprobs, expected) and same(completions.logprobs, expected)

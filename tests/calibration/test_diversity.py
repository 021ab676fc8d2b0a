"""Diversity measures of a set of generations."""

from __future__ import annotations

import pytest

from calibserve.calibration import distinct_n, pairwise_jaccard


def test_distinct_n() -> None:
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["same words", "same words"], 2) == 0.5
    assert distinct_n(["", "one"], 2) == 0.0  # no bigrams at all
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def test_pairwise_jaccard_is_similarity() -> None:
    assert pairwise_jaccard(["a b", "a b"]) == 1.0
    assert pairwise_jaccard(["a b", "c d"]) == 0.0
    # pairs: {a,b}-{a,c} = 1/3, {a,b}-{x} = 0, {a,c}-{x} = 0
    assert pairwise_jaccard(["a b", "a c", "x"]) == pytest.approx(1 / 9)
    assert pairwise_jaccard(["", ""]) == 1.0
    assert pairwise_jaccard(["only one"]) == 0.0
    diverse = ["the cat sat", "a dog ran", "birds fly high"]
    alike = ["the cat sat", "the cat sat down", "the cat sat"]
    assert pairwise_jaccard(diverse) < pairwise_jaccard(alike)
    assert distinct_n(diverse, 1) > distinct_n(alike, 1)

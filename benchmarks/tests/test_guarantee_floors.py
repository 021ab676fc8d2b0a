"""benchmarks/guarantee/floors.py's ceiling: what any threshold could keep and meet the validity
floor as written (realised test error), on items whose own curve is taken as the truth."""

from __future__ import annotations

import math

import numpy as np

from benchmarks.guarantee.floors import oracle_coverage, pool_ceiling
from benchmarks.guarantee.predictions import Tier


def tier(correct: list[bool]) -> Tier:
    n = len(correct)
    return Tier("t", np.linspace(1.0, 0.0, n), np.asarray(correct))


def miss(kept: int, error: float, alpha: float) -> float:
    """P(Binomial(kept, error) > alpha * kept), by hand."""
    top = math.floor(alpha * kept + 1e-9)
    return 1.0 - sum(math.comb(kept, j) * error**j * (1 - error) ** (kept - j)
                     for j in range(top + 1))


def test_all_right_keeps_everything() -> None:
    o = oracle_coverage(tier([True] * 50), 20, 0.2, 0.1)
    assert o == {"coverage": 1.0, "empirical_coverage": 1.0, "ratio": 1.0}


def test_the_ceiling_is_where_the_test_parts_noise_reaches_delta() -> None:
    # 50 right answers, then alternating right and wrong: kept error rises past 0.2 slowly.
    correct = [True] * 50 + [i % 2 == 0 for i in range(50)]
    o = oracle_coverage(tier(correct), 40, 0.2, 0.1)
    share = np.arange(1, 101) / 100
    error = np.cumsum(~np.asarray(correct)) / np.arange(1, 101)
    # The empirical threshold keeps every share whose kept error is <= 0.2.
    assert o["empirical_coverage"] == share[error <= 0.2 + 1e-12].max() == 0.85  # 17 of 85
    k = round(o["coverage"] * 100) - 1  # the ceiling's index
    assert miss(round(40 * share[k]), error[k], 0.2) <= 0.1
    # Every larger share would show more than 0.2 on the test part too often.
    assert all(miss(round(40 * share[j]), error[j], 0.2) > 0.1 for j in range(k + 1, 100))
    assert 0.5 < o["coverage"] < o["empirical_coverage"] and o["ratio"] < 1


def test_the_pool_ceiling_is_the_largest_fixed_threshold_the_re_splits_accept() -> None:
    rng = np.random.default_rng(3)
    score = rng.random(90)
    t = Tier("t", score, rng.random(90) < 0.4 + 0.6 * score)
    tests = [rng.permutation(90)[60:] for _ in range(200)]
    got = pool_ceiling(t, tests, 0.2, 0.1)

    def misses(th: float) -> float:  # share of test parts whose kept error exceeds 0.2, by hand
        out = 0
        for rows in tests:
            kept = t.score[rows] >= th
            out += int((kept & ~t.correct[rows]).sum()) > 0.2 * int(kept.sum())
        return out / len(tests)

    ok = [float((t.score >= th).mean()) for th in t.score if misses(th) <= 0.1]
    assert got["coverage"] == max(ok) > 0
    # every threshold that keeps more misses too often
    assert all(misses(th) > 0.1 for th in t.score if (t.score >= th).mean() > got["coverage"])


def test_the_pool_ceiling_keeps_everything_when_nothing_is_wrong() -> None:
    t = tier([True] * 30)
    tests = [np.arange(10, 30), np.arange(0, 20)]
    assert pool_ceiling(t, tests, 0.2, 0.1) == {"coverage": 1.0, "empirical_coverage": 1.0,
                                                 "ratio": 1.0}

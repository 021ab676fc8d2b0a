"""Certified thresholds: the exact Clopper-Pearson bound, the fixed-sequence scan, cascades."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibserve.calibration.errors import CalibrationError
from calibserve.calibration.guarantee import (
    batch_error_target,
    binomial_cdf,
    certify_cascade,
    certify_threshold,
    clopper_pearson_lower,
    clopper_pearson_upper,
    min_escalation_rate,
    min_kept,
    scan_target,
    start_points,
)


def test_binomial_cdf_by_hand() -> None:
    # P(Bin(4, 0.5) <= 1) = (1 + 4) / 16
    assert binomial_cdf(1, 4, 0.5) == pytest.approx(5 / 16, abs=1e-15)
    # P(Bin(3, 0.2) <= 0) = 0.8^3
    assert binomial_cdf(0, 3, 0.2) == pytest.approx(0.512, abs=1e-15)
    assert binomial_cdf(3, 3, 0.9) == 1.0


@pytest.mark.parametrize(("errors", "n", "delta", "expected"), [
    (0, 10, 0.1, 1 - 0.1 ** (1 / 10)),          # (1 - p)^n = delta
    (9, 10, 0.1, 0.9 ** (1 / 10)),              # 1 - p^n = delta
    (1, 2, 0.1, math.sqrt(0.9)),                # P(Bin(2, p) <= 1) = 1 - p^2 = delta
])
def test_clopper_pearson_closed_forms(errors: int, n: int, delta: float, expected: float) -> None:
    assert clopper_pearson_upper(errors, n, delta) == pytest.approx(expected, abs=1e-12)


def test_clopper_pearson_solves_the_tail_equation() -> None:
    # 2 errors of 10 at delta 0.1: 0.449604 (scipy.stats.beta.ppf(0.9, 3, 8), checked once);
    # the defining equation holds at the bound.
    p = clopper_pearson_upper(2, 10, 0.1)
    assert p == pytest.approx(0.4496039, abs=1e-6)
    by_hand = sum(math.comb(10, j) * p**j * (1 - p) ** (10 - j) for j in range(3))
    assert by_hand == pytest.approx(0.1, abs=1e-10)


@pytest.mark.parametrize(("errors", "n", "delta", "expected"), [
    (10, 10, 0.1, 0.1 ** (1 / 10)),             # p^n = delta
    (1, 10, 0.1, 1 - 0.9 ** (1 / 10)),          # 1 - (1 - p)^n = delta
    (0, 10, 0.1, 0.0),
])
def test_clopper_pearson_lower_closed_forms(errors: int, n: int, delta: float,
                                            expected: float) -> None:
    assert clopper_pearson_lower(errors, n, delta) == pytest.approx(expected, abs=1e-12)


def test_clopper_pearson_edges_and_bad_input() -> None:
    assert clopper_pearson_upper(5, 5, 0.1) == 1.0
    with pytest.raises(CalibrationError, match="delta"):
        clopper_pearson_upper(0, 5, 1.5)
    with pytest.raises(CalibrationError, match="errors"):
        clopper_pearson_upper(6, 5, 0.1)


def test_min_kept_and_min_escalation_rate() -> None:
    # 0.8^10 = 0.107 > 0.1, 0.8^11 = 0.086 <= 0.1
    assert min_kept(0.2, 0.1) == 11
    # mu 0.4, alpha 0.2: escalate at least 0.2 / 0.8 = 25%
    assert min_escalation_rate(0.4, 0.2) == pytest.approx(0.25)
    assert min_escalation_rate(0.1, 0.2) == 0.0


def _ranked(correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct confidences, most confident first, in the order given."""
    n = len(correct)
    return np.linspace(0.99, 0.01, n), np.asarray(correct)


def test_scan_certifies_the_largest_coverage_before_the_first_failure() -> None:
    # 60 right, then 25 wrong, then 500 right: a scan that went on would pass again deep in the
    # third block; fixed-sequence testing must stop where the wrong block first breaks the bound.
    correct = [True] * 60 + [False] * 25 + [True] * 500
    conf, y = _ranked(correct)
    cert = certify_threshold(conf, y, 0.2, 0.1)
    # The expected stopping point, by the slow route (the bisected bound at every prefix).
    last_pass = None
    for kept in range(min_kept(0.2, 0.1), len(correct) + 1):
        errors = correct[:kept].count(False)
        if clopper_pearson_upper(errors, kept, 0.1) > 0.2:
            break
        last_pass = kept
    assert last_pass is not None and 60 < last_pass < 85
    assert cert.kept == last_pass
    assert cert.threshold == pytest.approx(conf[last_pass - 1])
    assert cert.coverage == pytest.approx(last_pass / len(correct))
    assert cert.kept_errors == last_pass - 60
    assert cert.bound is not None and cert.bound <= 0.2
    # Keeping everything would also have a bound below 0.2 (25 errors of 585), unreachable here.
    assert clopper_pearson_upper(25, 585, 0.1) < 0.2


def test_scan_that_fails_at_its_first_test_certifies_nothing() -> None:
    # Three errors among the 11 most confident: the first testable point fails, and the 400
    # right answers below cannot rescue it.
    correct = [True] * 8 + [False] * 3 + [True] * 400
    conf, y = _ranked(correct)
    cert = certify_threshold(conf, y, 0.2, 0.1)
    assert not cert.certified
    assert cert.threshold == math.inf and cert.coverage == 0.0 and cert.bound is None
    assert "at least" not in cert.refusal()  # mu = 3 / 411 is under the target
    assert "within the target" in cert.refusal()


def test_infeasible_target_says_the_minimum_escalation_rate() -> None:
    rng = np.random.default_rng(0)
    conf = rng.random(500)
    y = rng.random(500) < 0.5  # confidence says nothing; error rate about 0.5
    cert = certify_threshold(conf, y, 0.05, 0.1)
    assert not cert.certified
    mu = 1 - y.mean()
    assert cert.error_rate == pytest.approx(mu)
    assert cert.min_escalation_rate == pytest.approx((mu - 0.05) / 0.95)
    assert f"{(mu - 0.05) / 0.95:.1%}" in cert.refusal()


def test_ties_are_kept_together() -> None:
    conf = np.array([0.9] * 20 + [0.5] * 20)
    y = np.array([True] * 20 + [True] * 10 + [False] * 10)
    cert = certify_threshold(conf, y, 0.2, 0.1)
    assert cert.threshold == 0.9 and cert.kept == 20  # all of 0.5 would be 25% errors


def test_cascade_certifies_each_tier_on_what_earlier_tiers_left() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    c1, c2 = rng.random(n), rng.random(n)
    y1, y2 = rng.random(n) < c1, rng.random(n) < (0.3 + 0.7 * c2)
    certs = certify_cascade([(c1, y1), (c2, y2)], 0.2, 0.1)
    assert [c.delta for c in certs] == [0.05, 0.05]
    first = certify_threshold(c1, y1, 0.2, 0.05)
    assert certs[0] == first
    left = ~(c1 >= first.threshold)
    second = certify_threshold(c2[left], y2[left], 0.2, 0.05)
    assert certs[1] == second and certs[1].n == int(left.sum())
    assert certs[1].certified


def test_cascade_refuses_tiers_of_different_sizes() -> None:
    with pytest.raises(CalibrationError, match="same items"):
        certify_cascade([([0.5, 0.6], [1, 0]), ([0.5], [1])], 0.2)


# -- batch certificates ---------------------------------------------------------------------------

def _beta_k(alpha: float, delta: float, k: int) -> float:
    """beta_K by plain bisection: the largest p with P(Bin(K, p) > floor(alpha K)) <= delta / 2."""
    allowed = math.floor(alpha * k)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binomial_cdf(allowed, k, mid) >= 1 - delta / 2 else (lo, mid)
    return lo


def test_batch_target_is_below_alpha_and_rises_to_it() -> None:
    targets = [batch_error_target(0.2, 0.1, m) for m in (1, 10, 50, 100, 200, 1000, 5000)]
    assert all(t < 0.2 for t in targets)
    assert targets == sorted(targets)
    assert targets[-1] > 0.19  # 5000 kept answers: within a point of alpha


def test_batch_target_of_one_answer_in_closed_form() -> None:
    # M = 1, alpha 0.2: K = 1..4 allow no error (floor(0.2 K) = 0), so beta_K solves
    # (1 - p)^K = 1 - delta / 2 and falls with K; K = 5 allows one. beta_1 = delta / 2.
    assert _beta_k(0.2, 0.1, 1) == pytest.approx(0.05, abs=1e-12)
    by_hand = [1 - 0.95 ** (1 / k) for k in range(1, 5)]
    assert [_beta_k(0.2, 0.1, k) for k in range(1, 5)] == pytest.approx(by_hand, abs=1e-12)
    assert batch_error_target(0.2, 0.1, 1) == pytest.approx(min(by_hand), abs=1e-12)
    assert batch_error_target(0.2, 0.1, 1) == pytest.approx(1 - 0.95 ** 0.25, abs=1e-12)


@pytest.mark.parametrize(("alpha", "m"), [(0.2, 1), (0.2, 7), (0.2, 50), (0.1, 1), (0.1, 30),
                                          (0.3, 20), (0.05, 3)])
def test_batch_target_is_the_minimum_over_every_larger_batch(alpha: float, m: int) -> None:
    # The search stops by a Chernoff bound, not at a window: a brute force over K in [M, 20 M]
    # finds nothing lower, and the minimum is attained.
    brute = min(_beta_k(alpha, 0.1, k) for k in range(m, 20 * m + 1))
    assert batch_error_target(alpha, 0.1, m) == pytest.approx(brute, abs=1e-9)


def test_batch_target_looks_past_four_batches_when_alpha_is_small() -> None:
    # alpha 0.1, M 1: K up to 9 allows no error, so the minimum is at K = 9, not in [1, 4].
    window = min(_beta_k(0.1, 0.1, k) for k in range(1, 5))
    assert batch_error_target(0.1, 0.1, 1) == pytest.approx(_beta_k(0.1, 0.1, 9), abs=1e-9)
    assert batch_error_target(0.1, 0.1, 1) < window


@pytest.mark.parametrize("batch", [0, -3, 2.5, True])
def test_batch_must_be_a_whole_number_of_answers(batch: object) -> None:
    with pytest.raises(CalibrationError, match="batch"):
        batch_error_target(0.2, 0.1, batch)  # type: ignore[arg-type]
    with pytest.raises(CalibrationError, match="batch"):
        certify_threshold([0.9, 0.8], [1, 1], 0.2, 0.1, batch=batch)  # type: ignore[arg-type]


def test_batch_certificate_certifies_the_batch_target_at_half_delta() -> None:
    for seed in range(5):
        rng = np.random.default_rng(seed)
        conf = rng.random(1500)
        y = rng.random(1500) < (1 + conf) / 2
        plain = certify_threshold(conf, y, 0.2, 0.1)
        batch = certify_threshold(conf, y, 0.2, 0.1, batch=100)
        assert batch.kept <= plain.kept  # a lower target at a lower level: keeps no more
        target = batch_error_target(0.2, 0.1, 100)
        assert (batch.batch, batch.batch_target, batch.max_error, batch.delta) == (
            100, target, 0.2, 0.1)
        assert (batch.target, batch.level) == scan_target(0.2, 0.1, 100) == (target, 0.05)
        assert batch.certified and batch.bound is not None and batch.bound <= target
        rate = certify_threshold(conf, y, target, 0.05)  # the same scan, by hand
        assert (batch.threshold, batch.kept, batch.bound) == (rate.threshold, rate.kept,
                                                               rate.bound)
    assert (plain.batch, plain.batch_target, plain.target, plain.level) == (None, None, 0.2, 0.1)


def test_batch_refusal_names_the_batch() -> None:
    correct = [True] * 8 + [False] * 3 + [True] * 400
    conf, y = _ranked(correct)
    cert = certify_threshold(conf, y, 0.2, 0.1, batch=50)
    assert not cert.certified
    assert "in any batch of at least 50 kept answers" in cert.refusal()
    assert "lower the batch" in cert.refusal()


def test_batch_cascade_splits_delta_per_tier_then_within_it() -> None:
    rng = np.random.default_rng(1)
    c1, c2 = rng.random(2000), rng.random(2000)
    y1, y2 = rng.random(2000) < c1, rng.random(2000) < (0.3 + 0.7 * c2)
    certs = certify_cascade([(c1, y1), (c2, y2)], 0.2, 0.1, batch=40)
    assert [(c.delta, c.batch, c.level) for c in certs] == [(0.05, 40, 0.025)] * 2
    assert certs[0] == certify_threshold(c1, y1, 0.2, 0.05, batch=40)
    assert certs[0].batch_target == batch_error_target(0.2, 0.05, 40)


def test_batch_certificate_holds_for_realised_batches() -> None:
    # Where the truth is known (c ~ U(0, 1), right with probability (1 + c) / 2): certify on 640,
    # judge a fresh 320; among draws whose test part keeps at least M = 50 answers, their
    # realised error exceeds 0.2 in at most delta = 0.1 of them.
    rng = np.random.default_rng(29)
    over = eligible = 0
    for _ in range(400):
        c = rng.random(640)
        y = rng.random(640) < (1 + c) / 2
        cert = certify_threshold(c, y, 0.2, 0.1, batch=50)
        ct = rng.random(320)
        yt = rng.random(320) < (1 + ct) / 2
        kept = ct >= cert.threshold
        if int(kept.sum()) >= 50:
            eligible += 1
            over += int((kept & ~yt).sum()) > 0.2 * int(kept.sum())
    assert eligible >= 100  # not vacuous
    assert over <= 0.1 * eligible


def test_more_starts_certify_a_ranking_whose_top_holds_errors() -> None:
    # The one-start case above: three errors among the 11 most confident end its only scan.
    # With three starts (delta / 3 each, at min_kept, twice and four times it), a later start
    # passes over the bad top and certifies the clean block below it.
    correct = [True] * 8 + [False] * 3 + [True] * 400
    conf, y = _ranked(correct)
    assert not certify_threshold(conf, y, 0.2, 0.1).certified
    cert = certify_threshold(conf, y, 0.2, 0.1, starts=3)
    level = 0.1 / 3
    assert cert.certified and cert.starts == 3 and cert.level == pytest.approx(level)
    # By hand: each sequence scans down from its start to its first failure; the certified
    # point is the deepest any reached.
    deepest = 0
    for start in start_points(min_kept(0.2, level), 3):
        for kept in range(start, len(correct) + 1):
            if clopper_pearson_upper(correct[:kept].count(False), kept, level) > 0.2:
                break
            deepest = max(deepest, kept)
    assert start_points(min_kept(0.2, level), 3) == [16, 32, 64]
    assert cert.kept == deepest == len(correct)  # 3 errors of 411: every answer kept
    assert cert.bound == pytest.approx(clopper_pearson_upper(3, 411, level))
    # One start is the plain scan, exactly.
    assert certify_threshold(conf, y, 0.2, 0.1, starts=1) == certify_threshold(conf, y, 0.2, 0.1)


def test_more_starts_cost_a_little_on_a_clean_ranking() -> None:
    correct = [True] * 60 + [False] * 25 + [True] * 500
    conf, y = _ranked(correct)
    one, three = (certify_threshold(conf, y, 0.2, 0.1, starts=k) for k in (1, 3))
    assert 0 < three.kept <= one.kept  # the same first failure, tested at a smaller level


@pytest.mark.parametrize("starts", [0, 9, 1.5, True])
def test_starts_must_be_a_small_whole_number(starts: object) -> None:
    with pytest.raises(CalibrationError, match="starts must be a whole number from 1 to 8"):
        certify_threshold([0.5, 0.6], [True, False], 0.2, 0.1, starts=starts)  # type: ignore[arg-type]


def test_a_certificate_of_several_starts_holds_where_the_truth_is_known() -> None:
    # Right with probability (1 + c) / 2, except the most confident 1% (c > 0.99), right only
    # half the time: a bad top, the case several starts are for. The true kept error at
    # threshold t (of the answers at or above it) is in closed form; it must exceed alpha in at
    # most delta of the draws. One start certifies almost nothing here, three most of the time.
    top = 0.99

    def true_error(t: float) -> float:
        lo = min(t, top)
        wrong = (top - lo) * (1 - (lo + top) / 2) / 2 + (1.0 - max(t, top)) * 0.5
        return wrong / (1.0 - t)

    rng = np.random.default_rng(7)
    over = certified = one_start = 0
    for _ in range(400):
        c = rng.random(640)
        y = rng.random(640) < np.where(c > top, 0.5, (1 + c) / 2)
        one_start += certify_threshold(c, y, 0.2, 0.1).certified
        cert = certify_threshold(c, y, 0.2, 0.1, starts=3)
        if cert.certified:
            certified += 1
            over += true_error(cert.threshold) > 0.2
    assert one_start <= 40 and certified >= 250  # not vacuous, and what starts are for
    assert over <= 0.1 * 400

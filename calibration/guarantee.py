"""Certified escalation thresholds: P(error rate of kept answers <= alpha) >= 1 - delta.

An answer is kept (served) when its calibrated confidence is at or above the threshold, else it
is escalated. `certify_threshold` picks the threshold by fixed-sequence testing of the exact
(Clopper-Pearson) binomial upper bound on the kept answers' error rate, as in "Trust or
Escalate" (Jung et al., ICLR 2025): the distinct confidences are scanned from the most
confident down; at each, the kept answers (those at or above it) give `kept` trials with
`kept_errors` errors, and the hypothesis "their error rate exceeds alpha" is rejected when the
one-sided upper bound at level 1 - delta is <= alpha. The scan stops at the first threshold
that is not rejected (fixed-sequence testing: only then does one test at level delta cover the
whole scan); the last rejected one is certified, the largest coverage the data can vouch for.

Points with fewer kept answers than `min_kept(alpha, delta)` cannot be rejected whatever the
data (even with no error the bound is above alpha); they are skipped, not tested, so the scan
starts at the first point with enough answers. When that first test already fails, nothing is
certified (`Certificate.certified` is False, the threshold is infinite: escalate everything).

`certify_cascade` does the same for several tiers answering the same items (the router's
escalation chain, primary first): each tier is certified on the items no earlier tier kept, at
delta / number of tiers (a union bound), so with probability >= 1 - delta every tier's kept
answers meet alpha and so does their union, the whole route's kept answers.

The guarantee assumes exchangeable traffic: the calibrate items and the served requests are
draws from one distribution (docs/operations.md says what breaks it; server/guarantee.py
watches it live).

Whatever the confidence, keeping a fraction c of the answers of a model whose error rate is mu
keeps at least mu - (1 - c) errors, so the kept error rate is at most alpha only if
1 - c >= (mu - alpha) / (1 - alpha): `min_escalation_rate`.

Batch certificates (`batch=M`, opt-in). The certificate above bounds the kept answers' error
*rate*; a finite batch of them (a day's traffic) shows that rate plus its own sampling noise, so
a batch's realised error fraction exceeds alpha more often than delta even when the rate is
below alpha. With `batch=M` the promise is about batches instead: for any one batch of at least M
kept answers, the chance (over the fit items and the batch) that more than alpha of it is wrong
is at most delta; given the fit, at most delta / 2 of such batches miss in the long run, with
probability >= 1 - delta / 2. It is not a promise that no batch of many ever misses. And the
chance bounded is that of a batch reaching M and missing: among only the batches that reached M
it can be higher when reaching M depends on the threshold (on a test set of fixed size, the fits
that keep the most answers, the lowest thresholds, are the ones that reach M).

Method: delta is split in two halves. A batch of exactly K kept answers whose error rate is p has
Binomial(K, p) wrong ones and misses iff more than floor(alpha K) are wrong; beta_K is the
largest p with P(Binomial(K, p) > floor(alpha K)) <= delta / 2, i.e. binomial_cdf(floor(alpha K),
K, p) >= 1 - delta / 2 (bisection). `batch_error_target` is beta = min over K >= M of beta_K, and
the scan above certifies the rate beta (instead of alpha) at delta / 2. Union bound: the rate is
above beta with probability <= delta / 2, and when it is at most beta a batch of K >= M kept
answers misses with probability <= delta / 2 (the binomial tail rises with p, and beta <= beta_K).

beta_K saw-tooths: within a run of K with the same floor(alpha K) it falls as K grows (more
trials, the same allowed errors), and jumps up where floor(alpha K) does, so the minimum over
K >= M is at the end of one of those runs. Their minima rise towards alpha; the search walks the
run ends from M up and stops at the first K with K * KL(alpha || beta) >= ln(2 / delta), past
which no batch can do worse (Chernoff: P(Binomial(K, p) >= alpha K) <= exp(-K KL(alpha || p))
for p < alpha), so the minimum is exact, not a window's. The tests check it against a brute
force over K in [M, 20 M]. For alpha 0.2 the minimum lies in [M, 4 M], but not always: when
alpha M < 1 the first run (no error allowed) lasts to K = ceil(1 / alpha) - 1, which can be far
beyond 4 M (alpha 0.1, M 1: K = 9; alpha 0.01, M 1: K = 99, past 20 M too). beta is below alpha
and rises to it as M grows (alpha 0.2, delta 0.1: 0.013 at M = 1, 0.119 at M = 50, 0.139 at
M = 100, 0.156 at M = 200, 0.180 at M = 1000), so a batch certificate keeps fewer answers than
the rate certificate.

Several starts (`starts=K`, opt-in; `calibserve certify --starts K`). One fixed sequence stops at
its first failure, so a ranking whose most confident answers are not its surest (two errors
among the top few) certifies nothing, however good the rest of it is; on a later tier of a route
(certified on the hard items the earlier tiers left) and at a route's delta / tiers this is
common. With K starts, K fixed sequences run, each at level / K (Bonferroni over the sequences):
the j-th skips the top `min_kept * 2**j` answers and scans down from there to its own first
failure; the certified threshold is the lowest any sequence reached. With probability >= 1 -
level every rejection in every sequence is right (each sequence's false rejections have
probability <= level / K), so the certificate's promise is unchanged; the starts depend on the
confidences only, never on the labels. It costs a smaller level per test (a few points of
coverage on a clean ranking) and buys robustness at the top (benchmarks/RESULTS.md, "several
starts").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from calibserve.calibration._inputs import as_pair
from calibserve.calibration.errors import CalibrationError

__all__ = [
    "DEFAULT_DELTA",
    "Certificate",
    "binomial_cdf",
    "certify_cascade",
    "batch_error_target",
    "certify_threshold",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "min_escalation_rate",
    "min_kept",
    "scan_target",
    "start_points",
]

DEFAULT_DELTA = 0.1
MAX_STARTS = 8  # fixed sequences a certificate may split its level over
_BISECTIONS = 80  # halves (0, 1) to below 1e-24: far past float precision


def _check_level(name: str, value: float) -> float:
    if not 0.0 < value < 1.0:  # also refuses NaN
        raise CalibrationError(f"{name} must be strictly between 0 and 1, got {value!r}")
    return float(value)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed exactly in log space (no normal approximation)."""
    if n < 0 or k < 0:
        raise CalibrationError(f"need 0 <= k and 0 <= n, got k={k}, n={n}")
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    j = np.arange(1, k + 1, dtype=np.float64)
    # log C(n, j) built up term by term: C(n, j) = C(n, j - 1) * (n - j + 1) / j.
    log_choose = np.concatenate(([0.0], np.cumsum(np.log((n - j + 1.0) / j))))
    terms = log_choose + np.arange(k + 1) * math.log(p) + (n - np.arange(k + 1)) * math.log1p(-p)
    top = float(terms.max())
    return float(min(1.0, math.exp(top) * float(np.exp(terms - top).sum())))


@functools.lru_cache(maxsize=4096)  # a live window asks for the same few counts again and again
def clopper_pearson_upper(errors: int, n: int, delta: float) -> float:
    """The exact one-sided upper bound at level 1 - delta on an error rate seen as `errors` of
    `n`: the p with P(Binomial(n, p) <= errors) = delta (1.0 when n = 0 or errors = n)."""
    delta = _check_level("delta", delta)
    if not 0 <= errors <= n:
        raise CalibrationError(f"need 0 <= errors <= n, got errors={errors}, n={n}")
    if errors >= n:
        return 1.0
    if errors == 0:
        return float(1.0 - delta ** (1.0 / n))  # closed form: (1 - p)^n = delta
    lo, hi = errors / n, 1.0  # the CDF falls from above delta (at the estimate) to 0
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2.0
        if binomial_cdf(errors, n, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


@functools.lru_cache(maxsize=4096)
def clopper_pearson_lower(errors: int, n: int, delta: float) -> float:
    """The exact one-sided lower bound at level 1 - delta on an error rate seen as `errors` of
    `n`: the p with P(Binomial(n, p) >= errors) = delta (0.0 when errors = 0). Above a target,
    the data say with confidence 1 - delta that the rate is above it."""
    delta = _check_level("delta", delta)
    if not 0 <= errors <= n:
        raise CalibrationError(f"need 0 <= errors <= n, got errors={errors}, n={n}")
    if errors == 0:
        return 0.0
    if errors == n:
        return float(delta ** (1.0 / n))  # closed form: p^n = delta
    lo, hi = 0.0, errors / n  # P(X >= errors) rises from 0 to above delta (at the estimate)
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2.0
        if 1.0 - binomial_cdf(errors - 1, n, mid) < delta:
            lo = mid
        else:
            hi = mid
    return lo


def _bound_at_most(errors: int, n: int, max_error: float, delta: float) -> bool:
    """Is the upper bound <= max_error? The bound is <= a iff P(Bin(n, a) <= errors) <= delta
    (the CDF falls as p rises): one CDF, no root finding."""
    return errors < n and binomial_cdf(errors, n, max_error) <= delta


def min_kept(max_error: float, delta: float) -> int:
    """Fewest kept answers whose bound can reach `max_error` at all (with no error among them):
    the least n with (1 - max_error)^n <= delta."""
    max_error, delta = _check_level("max_error", max_error), _check_level("delta", delta)
    return max(1, math.ceil(math.log(delta) / math.log1p(-max_error) - 1e-12))


def min_escalation_rate(error_rate: float, max_error: float) -> float:
    """The least share of traffic any threshold must escalate for its kept answers to have
    error rate <= max_error, when the model's error rate is `error_rate` (0 if it already is)."""
    if not 0.0 <= max_error < 1.0:
        raise CalibrationError(f"max_error must be in [0, 1), got {max_error!r}")
    return max(0.0, (error_rate - max_error) / (1.0 - max_error))


def _check_batch(batch: int) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise CalibrationError(f"batch must be a whole number of kept answers >= 1, got {batch!r}")
    return batch


def _batch_rate(allowed: int, k: int, level: float) -> float:
    """beta_K: the largest p with P(Binomial(k, p) <= allowed) >= 1 - level."""
    if allowed == 0:
        return float(1.0 - (1.0 - level) ** (1.0 / k))  # closed form: (1 - p)^k = 1 - level
    lo, hi = 0.0, 1.0  # the CDF falls from 1 (p = 0) to 0 (p = 1)
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2.0
        if binomial_cdf(allowed, k, mid) >= 1.0 - level:
            lo = mid
        else:
            hi = mid
    return lo


def _kl(a: float, p: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(p)), for 0 < a < 1 and 0 < p < 1."""
    return a * math.log(a / p) + (1.0 - a) * math.log((1.0 - a) / (1.0 - p))


@functools.lru_cache(maxsize=256, typed=True)  # typed: True is refused, 1 is not
def batch_error_target(max_error: float, delta: float, batch: int) -> float:
    """The kept answers' error rate beta to certify (at delta / 2) so that any one batch of at
    least `batch` kept answers has more than `max_error` of them wrong with probability at most
    delta: min over K >= batch of the largest p with P(Binomial(K, p) > floor(max_error K)) <=
    delta / 2 (module docstring: the method, and why the search may stop where it does)."""
    alpha, level = _check_level("max_error", max_error), _check_level("delta", delta) / 2.0
    k = _check_batch(batch)
    ln_level = math.log(1.0 / level)
    beta = 1.0
    while True:
        allowed = math.floor(alpha * k)
        # The end of this run of equal floor(alpha K): beta_K only falls along a run.
        k = max(k, math.ceil((allowed + 1) / alpha) - 1)
        while math.floor(alpha * (k + 1)) == allowed:
            k += 1
        while k > batch and math.floor(alpha * k) > allowed:
            k -= 1
        if beta == 1.0 or binomial_cdf(allowed, k, beta) < 1.0 - level:
            beta = min(beta, _batch_rate(allowed, k, level))
        if beta < alpha and k * _kl(alpha, beta) >= ln_level:  # Chernoff: no larger K is worse
            return beta
        k += 1


def _check_starts(starts: int) -> int:
    if isinstance(starts, bool) or not isinstance(starts, int) or not 1 <= starts <= MAX_STARTS:
        raise CalibrationError(f"starts must be a whole number from 1 to {MAX_STARTS}, got "
                               f"{starts!r}")
    return starts


def start_points(floor: int, starts: int) -> list[int]:
    """Where the fixed sequences start, as the fewest kept answers each tests: `floor` (the
    first testable point, `min_kept`), then twice and four times as many, and so on."""
    return [floor * 2**j for j in range(_check_starts(starts))]


def scan_target(max_error: float, delta: float, batch: int | None = None
                ) -> tuple[float, float]:
    """(rate, level) the fixed-sequence scan certifies for these targets: (max_error, delta),
    or with a batch (`batch_error_target`, delta / 2)."""
    if batch is None:
        return _check_level("max_error", max_error), _check_level("delta", delta)
    return batch_error_target(max_error, delta, batch), delta / 2.0


@dataclass(frozen=True)
class Certificate:
    """One certified threshold and the evidence for it.

    `threshold`: keep answers at or above it (math.inf when nothing could be certified: escalate
    everything); `coverage` the share of the `n` fit items kept; `kept` and `kept_errors` the
    kept answers and the wrong ones among them; `bound` their Clopper-Pearson upper bound at
    1 - delta (None when nothing is kept); `error_rate` the error rate of all n items (mu).
    `batch`: the batch size M of a batch certificate (None: the rate certificate), whose scan
    certified the rate `batch_target` (`batch_error_target`) at delta / 2, `bound` at that
    level; `max_error` and `delta` stay the targets asked for.
    """

    max_error: float
    delta: float
    n: int
    threshold: float
    coverage: float
    kept: int
    kept_errors: int
    bound: float | None
    error_rate: float
    batch: int | None = None
    batch_target: float | None = None
    starts: int = 1

    @property
    def certified(self) -> bool:
        return math.isfinite(self.threshold)

    @property
    def target(self) -> float:
        """The kept answers' error rate the scan certified: `batch_target`, else max_error."""
        return self.max_error if self.batch_target is None else self.batch_target

    @property
    def level(self) -> float:
        """The level of each test of the scan: delta, or delta / 2 for a batch certificate,
        divided by the number of starts."""
        return (self.delta if self.batch is None else self.delta / 2.0) / self.starts

    @property
    def min_escalation_rate(self) -> float:
        return min_escalation_rate(self.error_rate, self.target)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def refusal(self) -> str:
        """Why nothing was certified, in a user's terms (for a CLI error)."""
        need = self.min_escalation_rate
        floor = min_kept(self.target, self.level)
        limit = "max_error" if self.batch is None else "batch target"
        why = (f"the model's error rate on these {self.n} items is {self.error_rate:.3f}, so "
               f"any valid threshold must escalate at least {need:.1%} of traffic "
               f"((error - {limit}) / (1 - {limit}))") if need > 0 else (
               f"the model's error rate on these {self.n} items ({self.error_rate:.3f}) is "
               "within the target")
        batch = "" if self.batch is None else (
            f" in any batch of at least {self.batch} kept answers (so their error rate must "
            f"be certified <= {self.target:.4f} at delta {self.level:g})")
        where = (f"the scan starts at the top {floor} answers, the fewest whose bound can reach "
                 "the target, and their bound is above it" if self.starts == 1 else
                 f"{self.starts} scans start at the top "
                 f"{', '.join(map(str, start_points(floor, self.starts)))} answers, and each "
                 "one's first bound is above it")
        more = "" if self.starts > 1 else "start more scans (certify --starts 3), "
        return (f"no threshold keeps the error rate of kept answers <= {self.max_error:g}{batch} "
                f"with probability {1 - self.delta:g}: {why}; and the most confident answers do "
                f"not vouch for it ({where}). Raise the target, raise delta, {more}"
                + ("or fit on more items" if self.batch is None else
                   "lower the batch, or fit on more items"))


def certify_threshold(conf: ArrayLike, correct: ArrayLike, max_error: float,
                      delta: float = DEFAULT_DELTA, *, batch: int | None = None,
                      starts: int = 1) -> Certificate:
    """The largest-coverage threshold whose kept answers' error rate is certified <= max_error
    with probability >= 1 - delta, by fixed-sequence testing from the most confident down.
    With `batch=M`: any one batch of at least M kept answers has realised error <= max_error
    with probability >= 1 - delta (the scan certifies `batch_error_target` at delta / 2).
    With `starts=K`: K fixed sequences at level / K, starting ever lower (module docstring)."""
    max_error, delta = _check_level("max_error", max_error), _check_level("delta", delta)
    target, level = scan_target(max_error, delta, batch)
    level /= _check_starts(starts)
    batch_target = None if batch is None else target
    c, y = as_pair(conf, correct, allow_empty=True)
    n = int(c.size)
    wrong = 1.0 - y
    error_rate = float(wrong.mean()) if n else 0.0
    if n == 0:
        return Certificate(max_error, delta, 0, math.inf, 0.0, 0, 0, None, 0.0, batch,
                           batch_target, starts)
    order = np.argsort(-c, kind="stable")
    cs = c[order]
    kept_errors = np.cumsum(wrong[order])
    # Ties are kept or escalated together: a threshold's kept set ends at its run's last item.
    last = np.flatnonzero(np.append(cs[1:] != cs[:-1], True))
    best: int | None = None
    for start in start_points(min_kept(target, level), starts):
        for i in last:
            kept = int(i) + 1
            if kept < start:
                continue  # untestable (below min_kept), or before this sequence's start
            errors = int(round(float(kept_errors[i])))
            if not _bound_at_most(errors, kept, target, level):
                break  # fixed sequence: the first failure ends this scan
            best = int(i) if best is None else max(best, int(i))
    if best is None:
        return Certificate(max_error, delta, n, math.inf, 0.0, 0, 0, None, error_rate, batch,
                           batch_target, starts)
    kept = best + 1
    errors = int(round(float(kept_errors[best])))
    return Certificate(max_error, delta, n, float(cs[best]), kept / n, kept, errors,
                       clopper_pearson_upper(errors, kept, level), error_rate, batch, batch_target,
                       starts)


def certify_cascade(tiers: Sequence[tuple[ArrayLike, ArrayLike]], max_error: float,
                    delta: float = DEFAULT_DELTA, *, batch: int | None = None,
                    starts: int = 1) -> list[Certificate]:
    """One certificate per tier, primary first, from each tier's (confidence, correct) on the
    same items: tier i is certified on the items tiers 0..i-1 did not keep, at delta / tiers
    (with `batch`, each tier's batch certificate at its delta / tiers: every tier's kept answers
    then err at a rate <= its batch target, so a batch of the route's kept answers, however
    they split over the tiers, has at most Binomial(K, beta)'s errors)."""
    if not tiers:
        raise CalibrationError("a cascade needs at least one tier")
    pairs = [as_pair(c, y, allow_empty=True) for c, y in tiers]
    sizes = {c.size for c, _ in pairs}
    if len(sizes) != 1:
        raise CalibrationError(f"every tier must score the same items, got sizes {sorted(sizes)}")
    per_tier = _check_level("delta", delta) / len(pairs)
    open_items = np.ones(pairs[0][0].size, dtype=bool)  # not kept by any earlier tier
    out = []
    for c, y in pairs:
        cert = certify_threshold(c[open_items], y[open_items], max_error, per_tier,
                                 batch=batch, starts=starts)
        out.append(cert)
        if cert.certified:
            open_items &= ~(c >= cert.threshold)
    return out

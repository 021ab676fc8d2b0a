"""Validity and power of certified thresholds (issue 29 floors), not a timed test.

    python -m benchmarks.guarantee.floors [--splits 500] [--alpha 0.2] [--delta 0.1] [--batch M]

Validity: over `--splits` random calibrate/test re-splits of the items (2/3 calibrate, 1/3
test), the threshold certified on the calibrate part (`calibration.certify_threshold`) keeps
answers on the test part; the floor is that their realised error exceeds alpha in at most delta
of the re-splits. The same for a two-tier cascade (`certify_cascade`: the second tier certified
on the calibrate items the first did not keep, delta split between them): the realised error
of every answer the route keeps. A split whose test part keeps nothing has no kept error and
counts as no violation (the count is reported).

Power: on the same splits, today's empirical threshold at the same target
(`threshold_for_accuracy(target = 1 - alpha)`, what `--threshold auto` serves) keeps some
coverage of the test part; the floor is that the certified one keeps at least 80% of it. How
often the empirical threshold itself misses the target is reported too.

Batch certificates (`--batch M`: `certify_threshold(..., batch=M)`, issue 29's validity floor
as written): on the same splits, the batch certificate (single tier and cascade) is judged only
where the test part kept at least M answers (how many kept fewer is reported), against the same
floor (test kept error > alpha in at most delta of those splits), and over all splits (one that
kept fewer counts as no violation: the probability the certificate bounds; the share among the
judged ones is conditioned on a kept count that the calibrate draw moves). Its test coverage is
compared with the rate certificate's and the empirical threshold's, and the rate certificate's
share on its own splits that kept at least M is reported beside it. The synthetic population
check gets the batch certificate's share too.

`--starts K` certifies every threshold above by K fixed sequences (`certify_threshold(...,
starts=K)`: robust to a ranking whose most confident answers hold errors, at a smaller level).

Writes benchmarks/guarantee/results.json (or `--out`) and prints the RESULTS.md lines.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.common import machine, utc_now, write_json  # noqa: E402
from benchmarks.guarantee.predictions import Tier, demo_tiers, real_tiers  # noqa: E402
from calibserve.calibration import threshold_for_accuracy  # noqa: E402
from calibserve.calibration.guarantee import (  # noqa: E402
    MAX_STARTS,
    certify_cascade,
    certify_threshold,
)

HERE = Path(__file__).resolve().parent


def _kept_error(conf: np.ndarray, correct: np.ndarray, threshold: float) -> tuple[int, int]:
    kept = conf >= threshold
    return int(kept.sum()), int((kept & ~correct).sum())


def _cascade_kept(tiers: list[Tier], certs: list[Any], rows: np.ndarray) -> tuple[int, int]:
    """(kept, wrong) of a two-tier route's answers on `rows`."""
    p, e = tiers
    first = p.score[rows] >= certs[0].threshold
    second = ~first & (e.score[rows] >= certs[1].threshold)
    kept = int(first.sum() + second.sum())
    return kept, int((first & ~p.correct[rows]).sum() + (second & ~e.correct[rows]).sum())


def _batch_summary(kept: list[int], errors: list[int], plain: list[tuple[int, int]],
                   certified: list[bool], n_test: int, alpha: float, batch: int
                   ) -> dict[str, Any]:
    """The batch floor over the splits whose test part kept at least `batch` answers, and the
    rate certificate's (`plain`: its test kept, wrong) on the splits where it did."""
    k, w = np.asarray(kept), np.asarray(errors)
    eligible = k >= batch
    over = w > (alpha + 1e-12) * k
    pk, pw = np.asarray([a for a, _ in plain]), np.asarray([b for _, b in plain])
    plain_eligible = pk >= batch
    return {
        "eligible": int(eligible.sum()), "fewer_than_batch": int((~eligible).sum()),
        "violations": float(over[eligible].mean()) if eligible.any() else None,
        "violating_splits": int(over[eligible].sum()),
        # Over every re-split (one that kept fewer counts as no violation, as the rate
        # certificate's table counts a split that kept nothing): what the certificate bounds.
        "violations_all_splits": float((over & eligible).mean()),
        "mean_kept_error": float((w[eligible] / k[eligible]).mean()) if eligible.any() else None,
        "mean_coverage": float(k.mean() / n_test),
        "nothing_certified": int(len(certified) - sum(certified)),
        "plain_eligible": int(plain_eligible.sum()),
        "plain_violations": float((pw > (alpha + 1e-12) * pk)[plain_eligible].mean())
        if plain_eligible.any() else None,
    }


def oracle_coverage(tier: Tier, n_test: int, alpha: float, delta: float) -> dict[str, float]:
    """How much any threshold could keep and still meet the validity floor as written, if the
    items' own curve were the truth: the largest share whose kept error (on all items) would
    show more than alpha on a test part of `n_test` items (about n_test x share kept answers)
    with probability <= delta, against the share the empirical threshold keeps on all items.
    No calibrate sample's noise is charged, so no method choosing a threshold from data can do
    better: below 80% of the empirical coverage the validity and power floors cannot both be met
    on these items."""
    from calibserve.calibration.guarantee import binomial_cdf

    order = np.argsort(-tier.score, kind="stable")
    n = tier.score.size
    error = np.cumsum(~tier.correct[order]) / np.arange(1, n + 1)
    share = np.arange(1, n + 1) / n
    empirical = float(share[error <= alpha + 1e-12].max(initial=0.0))
    best = 0.0
    for k in range(n):
        kept = int(round(n_test * share[k]))
        if kept >= 1 and 1.0 - binomial_cdf(int(np.floor(alpha * kept + 1e-9)), kept,
                                              float(error[k])) <= delta:
            best = max(best, float(share[k]))
    return {"coverage": best, "empirical_coverage": empirical,
            "ratio": best / empirical if empirical else 0.0}


def pool_ceiling(tier: Tier, tests: list[np.ndarray], alpha: float, delta: float
                 ) -> dict[str, float]:
    """The same ceiling on the re-splits themselves: the most a threshold fixed in advance
    (knowing every item, so no calibrate noise charged) keeps of all items while the realised
    error of what it keeps on `tests` (each a re-split's test rows) exceeds alpha in at most
    delta of them. A test part is drawn without replacement from these items, so its kept
    error varies less than `oracle_coverage`'s binomial draw from a population: this ceiling
    is higher, and only a certificate that knew its traffic came from this very pool could
    reach it (one valid for traffic from a population is held to `oracle_coverage`)."""
    order = np.argsort(-tier.score, kind="stable")
    score, wrong = tier.score[order], ~tier.correct[order]
    n = score.size
    member = np.zeros((len(tests), n), bool)
    rank = np.empty(n, int)
    rank[order] = np.arange(n)
    for i, rows in enumerate(tests):
        member[i, rank[rows]] = True
    kept = np.cumsum(member, axis=1)  # test answers a threshold at score[k] keeps, per split
    errors = np.cumsum(member & wrong, axis=1)
    ends = np.append(score[1:] != score[:-1], True)  # a threshold keeps every tie
    over = (errors > (alpha + 1e-12) * kept).mean(axis=0)
    share = np.arange(1, n + 1) / n
    ok = ends & (over <= delta)
    pool_error = np.cumsum(wrong) / np.arange(1, n + 1)
    empirical = float(share[ends & (pool_error <= alpha + 1e-12)].max(initial=0.0))
    best = float(share[ok].max(initial=0.0))
    return {"coverage": best, "empirical_coverage": empirical,
            "ratio": best / empirical if empirical else 0.0}


def evaluate(tiers: list[Tier], splits: int, alpha: float, delta: float, seed: int = 0,
             batch: int | None = None, starts: int = 1) -> dict[str, Any]:
    """Validity (single tier, two-tier cascade) and power over `splits` re-splits; with
    `batch`, the batch certificate's too (`result["batch"]`)."""
    rng = np.random.default_rng(seed)
    n = tiers[0].score.size
    n_cal = (2 * n) // 3
    single: dict[str, list[float]] = {"error": [], "coverage": [], "cal_coverage": [],
                                      "pool_error": []}
    empirical: dict[str, list[float]] = {"error": [], "coverage": [], "cal_coverage": [],
                                         "pool_error": []}
    cascade: dict[str, list[float]] = {"error": [], "coverage": [], "first": [], "second": [],
                                       "pool_error": []}
    single_empty = cascade_empty = refused = 0
    tests: list[np.ndarray] = []
    # Batch certificates: test (kept, wrong) per split, and the rate certificates' beside them.
    runs: dict[str, dict[str, list[Any]]] = {
        k: {"kept": [], "errors": [], "plain": [], "certified": []}
        for k in ("single", "cascade")}
    for _ in range(splits):
        perm = rng.permutation(n)
        cal, test = perm[:n_cal], perm[n_cal:]
        tests.append(test)
        p = tiers[0]
        cert = certify_threshold(p.score[cal], p.correct[cal], alpha, delta, starts=starts)
        if not cert.certified:
            refused += 1
        kept, errors = _kept_error(p.score[test], p.correct[test], cert.threshold)
        single_empty += kept == 0
        single["error"].append(errors / kept if kept else 0.0)
        single["coverage"].append(kept / test.size)
        single["cal_coverage"].append(cert.coverage)
        if batch is not None:
            plain = _kept_error(p.score[test], p.correct[test], cert.threshold)
            bcert = certify_threshold(p.score[cal], p.correct[cal], alpha, delta, batch=batch,
                                      starts=starts)
            kept, errors = _kept_error(p.score[test], p.correct[test], bcert.threshold)
            runs["single"]["kept"].append(kept)
            runs["single"]["errors"].append(errors)
            runs["single"]["plain"].append(plain)
            runs["single"]["certified"].append(bcert.certified)
        kept, errors = _kept_error(p.score, p.correct, cert.threshold)
        single["pool_error"].append(errors / kept if kept else 0.0)
        emp = threshold_for_accuracy(p.score[cal], p.correct[cal], 1.0 - alpha)
        kept, errors = _kept_error(p.score[test], p.correct[test], float(emp["threshold"] or 0))
        empirical["error"].append(errors / kept if kept else 0.0)
        empirical["coverage"].append(kept / test.size)
        empirical["cal_coverage"].append(float(emp["coverage"] or 0.0))
        kept, errors = _kept_error(p.score, p.correct, float(emp["threshold"] or 0))
        empirical["pool_error"].append(errors / kept if kept else 0.0)
        if len(tiers) > 1:
            e = tiers[1]
            certs = certify_cascade([(p.score[cal], p.correct[cal]),
                                     (e.score[cal], e.correct[cal])], alpha, delta,
                                    starts=starts)
            first = p.score[test] >= certs[0].threshold
            second = ~first & (e.score[test] >= certs[1].threshold)
            kept = int(first.sum() + second.sum())
            errors = int((first & ~p.correct[test]).sum() + (second & ~e.correct[test]).sum())
            cascade_empty += kept == 0
            cascade["error"].append(errors / kept if kept else 0.0)
            cascade["coverage"].append(kept / test.size)
            cascade["first"].append(float(first.mean()))
            cascade["second"].append(float(second.mean()))
            first = p.score >= certs[0].threshold
            second = ~first & (e.score >= certs[1].threshold)
            kept = int(first.sum() + second.sum())
            errors = int((first & ~p.correct).sum() + (second & ~e.correct).sum())
            cascade["pool_error"].append(errors / kept if kept else 0.0)
            if batch is not None:
                pair = [(t.score[cal], t.correct[cal]) for t in tiers[:2]]
                bcerts = certify_cascade(pair, alpha, delta, batch=batch, starts=starts)
                kept, errors = _cascade_kept(tiers[:2], bcerts, test)
                runs["cascade"]["kept"].append(kept)
                runs["cascade"]["errors"].append(errors)
                runs["cascade"]["plain"].append(_cascade_kept(tiers[:2], certs, test))
                runs["cascade"]["certified"].append(bcerts[0].certified)

    def summary(d: dict[str, list[float]]) -> dict[str, float]:
        err = np.asarray(d["error"])
        pool = np.asarray(d["pool_error"])
        out = {"violations": float(np.mean(err > alpha + 1e-12)),
               "pool_violations": float(np.mean(pool > alpha + 1e-12)),
               "mean_kept_error": float(err.mean()), "p90_kept_error": float(np.quantile(err, 0.9))}
        out.update({f"mean_{k}": float(np.mean(v)) for k, v in d.items()
                    if k not in ("error", "pool_error")})
        return out

    result: dict[str, Any] = {
        "n": n, "n_calibrate": n_cal, "n_test": n - n_cal, "splits": splits,
        "alpha": alpha, "delta": delta, "starts": starts,
        "error_rate": {t.name: float(1 - t.correct.mean()) for t in tiers},
        "single": {**summary(single), "test_keeps_nothing": single_empty,
                   "nothing_certified": refused},
        "empirical": summary(empirical),
        "oracle": oracle_coverage(tiers[0], n - n_cal, alpha, delta),
        "pool_oracle": pool_ceiling(tiers[0], tests, alpha, delta),
    }
    result["power"] = result["single"]["mean_coverage"] / max(
        result["empirical"]["mean_coverage"], 1e-12)
    if len(tiers) > 1:
        result["cascade"] = {**summary(cascade), "test_keeps_nothing": cascade_empty}
    if batch is not None:
        from calibserve.calibration.guarantee import batch_error_target

        n_test = n - n_cal
        result["batch"] = {"batch": batch, "target": batch_error_target(alpha, delta, batch)}
        for name, run in runs.items():
            if run["kept"]:
                result["batch"][name] = _batch_summary(run["kept"], run["errors"], run["plain"],
                                                       run["certified"], n_test, alpha, batch)
        b = result["batch"]["single"]
        b["power_vs_empirical"] = b["mean_coverage"] / max(
            result["empirical"]["mean_coverage"], 1e-12)
        b["power_vs_certified"] = b["mean_coverage"] / max(
            result["single"]["mean_coverage"], 1e-12)
    return result


def population_check(runs: int, alpha: float, delta: float, n_cal: int = 640, n_test: int = 320,
                     seed: int = 0, batch: int | None = None) -> dict[str, Any]:
    """What the certificate promises, where the truth is known: confidence c ~ U(0, 1), right
    with probability (1 + c) / 2, so the error rate of the answers kept at threshold t is
    (1 - t) / 4 exactly. Fraction of calibrate samples whose certified threshold's true kept
    error exceeds alpha (the guarantee: at most delta), and, for contrast, of independent test
    samples of `n_test` whose realised kept error does (test noise on top of it). With `batch`,
    the batch certificate's realised test error on the same samples, over those whose test
    sample kept at least `batch` answers."""
    rng = np.random.default_rng(seed)
    true_over = test_over = batch_over = batch_eligible = 0
    for _ in range(runs):
        c = rng.random(n_cal)
        y = rng.random(n_cal) < (1 + c) / 2
        t = certify_threshold(c, y, alpha, delta).threshold
        true_over += (1 - t) / 4 > alpha if t <= 1 else False
        ct = rng.random(n_test)
        yt = rng.random(n_test) < (1 + ct) / 2
        kept = ct >= t
        test_over += (kept & ~yt).sum() / max(int(kept.sum()), 1) > alpha
        if batch is not None:
            kept = ct >= certify_threshold(c, y, alpha, delta, batch=batch).threshold
            if int(kept.sum()) >= batch:
                batch_eligible += 1
                batch_over += int((kept & ~yt).sum()) > (alpha + 1e-12) * int(kept.sum())
    out: dict[str, Any] = {"runs": runs, "n_calibrate": n_cal, "n_test": n_test,
                           "true_error_over_alpha": true_over / runs,
                           "realised_test_error_over_alpha": test_over / runs}
    if batch is not None:
        out["batch"] = {"batch": batch, "eligible": batch_eligible,
                        "realised_test_error_over_alpha":
                        batch_over / batch_eligible if batch_eligible else None}
    return out


def lines(name: str, r: dict[str, Any]) -> list[str]:
    s, e = r["single"], r["empirical"]
    out = [
        f"**{name}** ({r['n']} items: {r['n_calibrate']} calibrate / {r['n_test']} test, "
        f"{r['splits']} re-splits, alpha {r['alpha']:g}, delta {r['delta']:g}"
        + (f", {r['starts']} starts" if r.get("starts", 1) > 1 else "") + "; error rates "
        + ", ".join(f"{k} {v:.3f}" for k, v in r["error_rate"].items()) + ")",
        "",
        "| threshold | re-splits whose test kept error > alpha | same, error on all items "
        "| mean test kept error | 90th pct | mean test coverage |",
        "|---|---|---|---|---|---|",
        f"| certified, one tier | {s['violations']:.3f} | {s['pool_violations']:.3f} | "
        f"{s['mean_kept_error']:.3f} | {s['p90_kept_error']:.3f} | {s['mean_coverage']:.3f} |",
    ]
    if "cascade" in r:
        c = r["cascade"]
        out.append(f"| certified, two-tier cascade | {c['violations']:.3f} | "
                   f"{c['pool_violations']:.3f} | {c['mean_kept_error']:.3f} | "
                   f"{c['p90_kept_error']:.3f} | "
                   f"{c['mean_coverage']:.3f} (first {c['mean_first']:.3f} + second "
                   f"{c['mean_second']:.3f}) |")
    out.append(f"| empirical (`auto`, target accuracy {1 - r['alpha']:g}) | "
               f"{e['violations']:.3f} | {e['pool_violations']:.3f} | {e['mean_kept_error']:.3f} | "
               f"{e['p90_kept_error']:.3f} | {e['mean_coverage']:.3f} |")
    out += ["", f"Power: the certified threshold keeps {r['power']:.1%} of the empirical "
            f"threshold's test coverage ({s['mean_coverage']:.3f} vs {e['mean_coverage']:.3f}: "
            f"the guarantee costs {e['mean_coverage'] - s['mean_coverage']:.3f} of coverage); "
            f"nothing certified in {s['nothing_certified']} of {r['splits']} splits."]
    if "oracle" in r:
        o = r["oracle"]
        out += ["", f"Ceiling: a threshold that knew these items' curve could keep at most "
                f"{o['coverage']:.3f} of them and meet the validity floor on a {r['n_test']}-item "
                f"test part, {o['ratio']:.1%} of the {o['empirical_coverage']:.3f} the empirical "
                "threshold keeps on them. Below 80%, validity and power cannot both be met on "
                "test parts drawn from a population with this curve."]
    if "pool_oracle" in r:
        o = r["pool_oracle"]
        out += ["", f"Ceiling on these re-splits (test parts drawn without replacement from "
                f"these {r['n']} items, less noisy than a population's): {o['coverage']:.3f}, "
                f"{o['ratio']:.1%} of the empirical coverage; above the first ceiling only for "
                "a certificate that assumed its traffic came from this very pool."]
    if "batch" in r:
        out += ["", *batch_lines(r)]
    return out


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def batch_lines(r: dict[str, Any]) -> list[str]:
    """The batch certificate's floor: a table row per route, then the coverage it costs."""
    b, s, e = r["batch"], r["single"], r["empirical"]
    m = b["batch"]
    out = [f"Batch certificate, M = {m} (rate certified <= {b['target']:.4f} at delta "
           f"{r['delta'] / 2:g}): judged on the re-splits whose test part kept >= {m} answers.",
           "",
           f"| batch certificate | re-splits judged (test kept >= {m}) | fewer than {m} kept "
           "| test kept error > alpha (violating) | same, over all re-splits "
           f"| rate certificate, its re-splits with >= {m} kept | mean test kept error "
           "| mean test coverage |",
           "|---|---|---|---|---|---|---|---|"]
    for name, label in (("single", "one tier"), ("cascade", "two-tier cascade")):
        if name not in b:
            continue
        x = b[name]
        mean_err = "n/a" if x["mean_kept_error"] is None else f"{x['mean_kept_error']:.3f}"
        out.append(f"| {label} | {x['eligible']} | {x['fewer_than_batch']} | "
                   f"{_share(x['violations'])} ({x['violating_splits']}) | "
                   f"{x['violations_all_splits']:.3f} | "
                   f"{_share(x['plain_violations'])} (of {x['plain_eligible']}) | {mean_err} | "
                   f"{x['mean_coverage']:.3f} |")
    x = b["single"]
    out += ["", f"Coverage: the batch certificate keeps {x['mean_coverage']:.3f} of the test "
            f"answers, {x['power_vs_certified']:.1%} of the rate certificate's "
            f"({s['mean_coverage']:.3f}) and {x['power_vs_empirical']:.1%} of the empirical "
            f"threshold's ({e['mean_coverage']:.3f}); nothing certified in "
            f"{x['nothing_certified']} of {r['splits']} splits"
            + (f" (the cascade's primary: {b['cascade']['nothing_certified']})"
               if "cascade" in b else "") + "."]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--splits", type=int, default=500)
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    ap.add_argument("--batch", type=int, default=None, metavar="M",
                    help="also judge the batch certificate for batches of at least M kept "
                    "answers (default: none)")
    ap.add_argument("--starts", type=int, default=1, metavar="K",
                    help="certify by K fixed sequences (calibration.guarantee; default 1)")
    ap.add_argument("--demo-world", default=None,
                    help="the demo world's digest (.calibserve/demo/DIGEST); default: the newest "
                    "merged world with an expert calibration")
    args = ap.parse_args(argv)
    if not 1 <= args.starts <= MAX_STARTS:
        ap.error(f"--starts must be from 1 to {MAX_STARTS}, got {args.starts}")
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "date": utc_now()}
    where, tiers = demo_tiers(args.demo_world)
    if args.batch is not None and args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    results["demo"] = {**where, **evaluate(tiers, args.splits, args.alpha, args.delta,
                                           batch=args.batch, starts=args.starts)}
    real = real_tiers()
    if real is not None:
        where, tiers = real
        results["real"] = {**where, **evaluate(tiers, args.splits, args.alpha, args.delta,
                                               batch=args.batch, starts=args.starts)}
    results["population"] = population_check(2000, args.alpha, args.delta, batch=args.batch)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, results, indent=1)
    print(f"{results['machine']}, {results['date']}, {results['wall_seconds']} s")
    print("\n".join(lines("demo", results["demo"])))
    if "real" in results:
        print()
        print("\n".join(lines("real", results["real"])))
    pop = results["population"]
    print(f"\nsynthetic population ({pop['runs']} runs, n {pop['n_calibrate']}): true kept error "
          f"> alpha in {pop['true_error_over_alpha']:.3f}; realised on an independent test of "
          f"{pop['n_test']} > alpha in {pop['realised_test_error_over_alpha']:.3f}")
    if "batch" in pop:
        pb = pop["batch"]
        print(f"synthetic, batch certificate M = {pb['batch']}: realised test kept error > "
              f"alpha in {_share(pb['realised_test_error_over_alpha'])} of the "
              f"{pb['eligible']} runs whose test sample kept >= {pb['batch']}")


if __name__ == "__main__":
    main()

"""A real primary escalating to a real, stronger expert (issue 29 item 5), not a timed test.

    python -m benchmarks.guarantee.real_route [--primary TABLE:ROW] [--expert TABLE:ROW]
                                              [--middle TABLE:ROW] [--batch M] [--out DIR]

Both models are served by calibserve and asked the same held-out short-answer questions of the
world facts through the openai SDK (`benchmarks.realworld.remedy_table`; each row's
`answers.jsonl` holds the reply and its served confidence). The defaults: SmolLM2-135M-Instruct
after seed 004's CFT with the calibrator fitted on the calibrate split
(`benchmarks/realworld/smollm2_seed004.sh`) escalating to the Gemma 3 270M pair's merge with
its own calibrator (`gemma_pair.sh`).

1. The escalation curve: accuracy of the final answers against the escalation rate when the
   primary's least confident answers go to the expert (the calibrated route), against random
   escalation (its expectation) and the oracle (the primary's wrong answers that the expert gets
   right go first): `escalation.png`.
2. The guaranteed threshold (`calibration.certify_threshold`, alpha 0.2, delta 0.1) certified on
   a seeded 2/3 calibrate part of the items: its realised error and coverage on the held-out
   third, the escalation rate it implies and the route's accuracy there; and over `--splits`
   random re-splits, how often the realised kept error exceeds alpha, for the primary alone and
   for the two-tier cascade (`benchmarks.guarantee.floors.evaluate`). With `--batch M`, the
   batch certificate too (`certify_threshold(..., batch=M)`): on the seeded split, and over
   the re-splits judged where the test part kept at least M answers.

3. With `--middle TABLE:ROW`, a route of three: the primary, then the middle tier, then the
   expert, certified together (`calibration.certify_cascade`, what `calibserve certify` runs:
   each tier on the items the tiers before it did not keep, at delta / 3) on the seeded
   calibrate part, and judged on the held-out third (what each tier keeps, the realised error
   of the answers the judged tiers keep, the route's accuracy) and over the re-splits (how often
   that realised error exceeds alpha, the coverage, how often the middle tier certified
   anything) (`three_tier_route`).

Writes OUT/results.json and OUT/escalation.png (default benchmarks/results/real_route) and
prints the RESULTS.md lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.common import machine, utc_now, write_json  # noqa: E402
from benchmarks.escalation.report import plot, table  # noqa: E402
from benchmarks.guarantee.floors import evaluate, lines  # noqa: E402
from benchmarks.guarantee.predictions import Tier, table_tiers  # noqa: E402
from calibserve.calibration.guarantee import (  # noqa: E402
    MAX_STARTS,
    certify_cascade,
    certify_threshold,
)

REALWORLD = Path(os.environ.get("CALIBSERVE_HOME", REPO / ".calibserve")) / "realworld"
RATES = tuple(round(0.05 * k, 2) for k in range(21))


def route_accuracy(primary: Tier, expert: Tier, escalate: np.ndarray) -> float:
    """Accuracy of the final answers when the items where `escalate` is true go to the expert."""
    return float(np.where(escalate, expert.correct, primary.correct).mean())


def _first(order: np.ndarray, k: int) -> np.ndarray:
    chosen = np.zeros(order.size, bool)
    chosen[order[:k]] = True
    return chosen


def curves(primary: Tier, expert: Tier, rates: tuple[float, ...] = RATES
           ) -> dict[str, list[float]]:
    """Accuracy at each escalation rate: the calibrated route (least confident first), random
    escalation (exact expectation) and the oracle (primary wrong and expert right first, then
    both wrong, then both right, then primary right and expert wrong)."""
    n = primary.score.size
    by_confidence = np.argsort(primary.score, kind="stable")
    gain = expert.correct.astype(int) - primary.correct.astype(int)  # +1, 0 or -1
    tier = np.where(gain > 0, 0, np.where(gain == 0, np.where(primary.correct, 2, 1), 3))
    by_oracle = np.argsort(tier, kind="stable")
    acc_p, acc_e = float(primary.correct.mean()), float(expert.correct.mean())
    out: dict[str, list[float]] = {"calibrated route": [], "random": [], "oracle": []}
    for rate in rates:
        k = round(rate * n)
        out["calibrated route"].append(route_accuracy(primary, expert, _first(by_confidence, k)))
        out["random"].append(acc_p + (k / n) * (acc_e - acc_p))
        out["oracle"].append(route_accuracy(primary, expert, _first(by_oracle, k)))
    return out


def guaranteed_route(primary: Tier, expert: Tier, alpha: float, delta: float, seed: int = 0,
                     batch: int | None = None, starts: int = 1) -> dict[str, Any]:
    """Certify the primary's threshold on a seeded 2/3 of the items; what it does on the rest
    (`batch`: the batch certificate's)."""
    n = primary.score.size
    perm = np.random.default_rng(seed).permutation(n)
    cal, test = perm[: (2 * n) // 3], perm[(2 * n) // 3:]
    cert = certify_threshold(primary.score[cal], primary.correct[cal], alpha, delta,
                             batch=batch, starts=starts)
    kept = primary.score[test] >= cert.threshold
    errors = int((kept & ~primary.correct[test]).sum())
    held_p = Tier(primary.name, primary.score[test], primary.correct[test])
    held_e = Tier(expert.name, expert.score[test], expert.correct[test])
    return {
        "batch": batch, "batch_target": cert.batch_target,
        "n_calibrate": int(cal.size), "n_test": int(test.size), "certified": cert.certified,
        "threshold": cert.threshold, "bound": cert.bound, "calibrate_coverage": cert.coverage,
        "test_kept": int(kept.sum()), "test_kept_errors": errors,
        "test_kept_error": errors / int(kept.sum()) if kept.any() else None,
        "test_escalation_rate": float(1 - kept.mean()),
        "test_route_accuracy": route_accuracy(held_p, held_e, ~kept),
        "test_primary_accuracy": float(held_p.correct.mean()),
        "test_expert_accuracy": float(held_e.correct.mean()),
    }


def _walk(tiers: list[Tier], thresholds: list[float], rows: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """Which tier answers each of `rows` (the first whose score clears its threshold, else the
    last: the last tier is never judged) and whether that answer is kept under the guarantee
    (answered by a judged tier, not the last)."""
    answering = np.full(rows.size, len(tiers) - 1)
    for i in range(len(tiers) - 2, -1, -1):
        answering = np.where(tiers[i].score[rows] >= thresholds[i], i, answering)
    return answering, answering < len(tiers) - 1


def _route_outcome(tiers: list[Tier], thresholds: list[float], rows: np.ndarray
                   ) -> dict[str, Any]:
    answering, kept = _walk(tiers, thresholds, rows)
    right = np.choose(answering, [t.correct[rows] for t in tiers])
    errors = int((kept & ~right).sum())
    return {"answered_by": [int((answering == i).sum()) for i in range(len(tiers))],
            "kept": int(kept.sum()), "kept_errors": errors,
            "kept_error": errors / int(kept.sum()) if kept.any() else None,
            "route_accuracy": float(right.mean())}


def three_tier_route(tiers: list[Tier], alpha: float, delta: float, splits: int = 500,
                     seed: int = 0, starts: int = 1) -> dict[str, Any]:
    """The route of three certified together on a seeded 2/3 calibrate part (what happens on
    the held-out third), then over `splits` random re-splits: how often the realised error of
    the answers the judged tiers keep exceeds alpha, their coverage, how often the middle tier
    certified anything. A tier that certified nothing keeps nothing (threshold infinity)."""
    n = tiers[0].score.size
    n_cal = (2 * n) // 3

    def certified(cal: np.ndarray) -> tuple[list[Any], list[float]]:
        certs = certify_cascade([(t.score[cal], t.correct[cal]) for t in tiers], alpha, delta,
                                starts=starts)
        return certs, [c.threshold if c.certified else float("inf") for c in certs]

    perm = np.random.default_rng(seed).permutation(n)
    certs, thresholds = certified(perm[:n_cal])
    seeded = {"n_calibrate": n_cal, "n_test": n - n_cal,
              "certified": [c.certified for c in certs], "thresholds": thresholds[:-1],
              **_route_outcome(tiers, thresholds, perm[n_cal:])}
    rng = np.random.default_rng(seed + 1)
    over, coverage, middle = [], [], 0
    for _ in range(splits):
        perm = rng.permutation(n)
        certs, thresholds = certified(perm[:n_cal])
        middle += certs[1].certified
        out = _route_outcome(tiers, thresholds, perm[n_cal:])
        over.append(out["kept_error"] is not None and out["kept_error"] > alpha + 1e-12)
        coverage.append(out["kept"] / (n - n_cal))
    return {"tiers": [t.name for t in tiers],
            "accuracy": [float(t.correct.mean()) for t in tiers], "seeded": seeded,
            "resplits": {"splits": splits, "violations": float(np.mean(over)),
                         "mean_coverage": float(np.mean(coverage)),
                         "middle_certified": middle}}


def three_tier_lines(r: dict[str, Any], alpha: float, delta: float) -> list[str]:
    s, x = r["seeded"], r["resplits"]
    names = ", ".join(f"`{t}` {a:.3f}" for t, a in zip(r["tiers"], r["accuracy"], strict=True))
    err = "n/a" if s["kept_error"] is None else f"{s['kept_error']:.3f}"
    shown = ", ".join("none" if not c else f"{t:.3f}"
                      for c, t in zip(s["certified"], s["thresholds"], strict=False))
    return [f"Route of three ({names}; alpha {alpha:g}, delta {delta:g} split over the three): "
            f"on the seeded split the thresholds certified are {shown} (primary, middle); on the "
            f"{s['n_test']} held-out items the tiers answer {s['answered_by']} (primary, middle, "
            f"expert), the judged tiers keep {s['kept']} with realised error {err}, and the "
            f"route is {s['route_accuracy']:.3f} accurate. Over {x['splits']} re-splits: "
            f"realised kept error > alpha in {x['violations']:.3f}, mean coverage "
            f"{x['mean_coverage']:.3f}, the middle tier certified in {x['middle_certified']}."]


def _source(text: str) -> tuple[Path, str]:
    table, sep, row = text.rpartition(":")
    if not sep or not table or not row:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TABLE_DIR:ROW")
    return Path(table), row


def report_lines(r: dict[str, Any]) -> list[str]:
    g = r["guaranteed"]
    kept_error = "n/a" if g["test_kept_error"] is None else f"{g['test_kept_error']:.3f}"
    bound = "none" if g["bound"] is None else f"{g['bound']:.3f}"
    out = [f"{r['machine']}, {r['date']}, {r['wall_seconds']} s; {r['items']} held-out items "
           f"answered by both: primary `{r['rows'][0]}` accuracy {r['accuracy']['primary']:.3f}, "
           f"expert `{r['rows'][-1]}` {r['accuracy']['expert']:.3f}.", "",
           table(RATES, r["curves"]), "",
           f"Guaranteed threshold (alpha {r['alpha']:g}, delta {r['delta']:g}"
           + ("" if g.get("batch") is None else
              f", batch certificate M = {g['batch']}: rate <= {g['batch_target']:.4f}")
           + "), certified on "
           f"{g['n_calibrate']} items, {'certified' if g['certified'] else 'NOTHING certified'}: "
           f"threshold {g['threshold']:.3f} (upper bound {bound}); on the {g['n_test']} held-out "
           f"items it keeps {g['test_kept']} ({1 - g['test_escalation_rate']:.1%}) with realised "
           f"error {kept_error}, escalates {g['test_escalation_rate']:.1%}, and the route is "
           f"{g['test_route_accuracy']:.3f} accurate (primary alone "
           f"{g['test_primary_accuracy']:.3f}, expert alone {g['test_expert_accuracy']:.3f}).", ""]
    return out + lines("real primary -> real expert", r["resplits"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--primary", type=_source,
                    default=(REALWORLD / "smollm2-table", "smollm2-cft-calibrated"),
                    help="TABLE_DIR:ROW of a remedy_table run (default: SmolLM2 CFT + its "
                    "calibrator)")
    ap.add_argument("--expert", type=_source,
                    default=(REALWORLD / "remedy-table", "merge-calibrated"),
                    help="TABLE_DIR:ROW (default: the Gemma pair's merge + its calibrator)")
    ap.add_argument("--middle", type=_source, default=None,
                    help="TABLE_DIR:ROW of a middle tier between them: also certify and judge "
                    "the route of three (default: none)")
    ap.add_argument("--starts", type=int, default=1, metavar="K",
                    help="certify by K fixed sequences (calibration.guarantee; default 1)")
    ap.add_argument("--items", type=Path,
                    default=REALWORLD / "data" / "world_facts" / "short_test.jsonl")
    ap.add_argument("--splits", type=int, default=500)
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "real_route")
    ap.add_argument("--batch", type=int, default=None, metavar="M",
                    help="certify batches of at least M kept answers too (the seeded split's "
                    "threshold is then the batch certificate's; default: none)")
    args = ap.parse_args(argv)
    if not 1 <= args.starts <= MAX_STARTS:
        ap.error(f"--starts must be from 1 to {MAX_STARTS}, got {args.starts}")
    if args.batch is not None and args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    started = time.perf_counter()
    sources = [args.primary, *([args.middle] if args.middle else []), args.expert]
    loaded = table_tiers(sources, args.items)
    if loaded is None:
        shown = ", ".join(f"{table}/rows/{row}" for table, row in sources)
        print(f"real_route: missing answers or items: {shown} and {args.items} must all exist "
              "(run benchmarks/realworld/gemma_pair.sh and smollm2_seed004.sh first)",
              file=sys.stderr)
        return 2
    where, tiers = loaded
    primary, expert = tiers[0], tiers[-1]
    result: dict[str, Any] = {
        "machine": machine(), "date": utc_now(),
        **where, "alpha": args.alpha, "delta": args.delta,
        "accuracy": {"primary": float(primary.correct.mean()),
                     "expert": float(expert.correct.mean())},
        "rates": list(RATES), "curves": curves(primary, expert),
        "starts": args.starts,
        "guaranteed": guaranteed_route(primary, expert, args.alpha, args.delta,
                                       batch=args.batch, starts=args.starts),
        "resplits": evaluate([primary, expert], args.splits, args.alpha, args.delta,
                             batch=args.batch, starts=args.starts),
    }
    if args.middle:
        result["three_tiers"] = three_tier_route(tiers, args.alpha, args.delta, args.splits,
                                                 starts=args.starts)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out / "results.json", result, indent=1)
    plot(args.out / "escalation.png", RATES, result["curves"], result["accuracy"]["expert"],
         f"{primary.name} escalating to {expert.name}: {result['items']} held-out world facts")
    print("\n".join(report_lines(result)))
    if "three_tiers" in result:
        print("\n" + "\n".join(three_tier_lines(result["three_tiers"], args.alpha, args.delta)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

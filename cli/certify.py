"""`calibserve certify`: certified thresholds for a whole escalation route (issue 29 item 2).

    calibserve certify --tier PRIMARY --tier EXPERT [--calibration P.json --calibration E.json]
                       --data DIR --max-error 0.2 [--delta 0.1] [--batch M] [--starts K]
                       [--device cuda]

Each tier is scored on `DIR/calibrate.jsonl` with its own calibration document; the primary's
threshold is certified on all items, the next tier's on the items the primary did not keep, and
so on, each at delta / tiers (`merge.certify_route`); `--batch M` certifies every batch of at least
M kept answers instead of the long-run rate. The documents are rewritten with their
certificate (a tier that certified nothing loses any older certificate for `--max-error`);
serve the route with `calibserve serve --model PRIMARY --escalate-to EXPERT
--escalate-calibration E.json --threshold guaranteed --max-error 0.2`. `--starts K` runs K
fixed sequences per tier (`calibration.guarantee`), for tiers whose most confident answers are
not their surest. `--device cuda` scores the tiers on a GPU. Errors name the flag, exit status 2,
nothing written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from calibserve.calibration.guarantee import DEFAULT_DELTA

__all__ = ["certify"]


def certify(
    tier: Annotated[list[Path], typer.Option(
        "--tier", help="a tier's checkpoint directory, primary first (repeatable)")],
    data: Annotated[Path, typer.Option(
        "--data", help="directory whose calibrate.jsonl (multiple choice) every tier answers")],
    max_error: Annotated[float, typer.Option(
        "--max-error", help="the error rate of kept answers to certify for the whole route "
        "(one value)")],
    delta: Annotated[float, typer.Option(
        "--delta", help="the chance the certificate may be wrong (split evenly over the tiers)")
    ] = DEFAULT_DELTA,
    batch: Annotated[int | None, typer.Option(
        "--batch", metavar="M", help="with --max-error: certify every batch of at least M kept "
        "answers (a day's traffic, say), not only the long-run rate (costs coverage)")] = None,
    calibration: Annotated[list[Path] | None, typer.Option(
        "--calibration", help="the calibration.json of the --tier in the same position, "
        "rewritten with its certificate [default: TIER/calibration.json]")] = None,
    starts: Annotated[int, typer.Option(
        "--starts", metavar="K", help="certify each tier by K fixed sequences at delta / K "
        "each, starting ever lower in its ranking: a tier whose most confident answers hold "
        "an error or two can still be certified (costs a little coverage on a clean ranking)")
    ] = 1,
    device: Annotated[str, typer.Option(
        "--device", help="where the tiers are scored (float32, transformers): cpu, cuda, "
        "cuda:N or mps")] = "cpu",
) -> None:
    """Certify the thresholds of an escalation route, tier by tier, on labelled items."""
    from calibserve.merge.certify_route import RouteTier, certify_route
    from calibserve.merge.errors import MergeError

    files = list(calibration or [])
    if len(files) > len(tier):
        typer.echo("Error: Invalid value for '--calibration': more files than --tier", err=True)
        raise typer.Exit(2)
    files += [t / "calibration.json" for t in tier[len(files):]]
    tiers = [RouteTier(t, f) for t, f in zip(tier, files, strict=True)]
    try:
        results = certify_route(tiers, data, max_error, delta, batch, device, starts)
    except MergeError as exc:
        where = f"Invalid value for '{exc.param}': " if exc.param else ""
        typer.echo(f"Error: {where}{exc.message}", err=True)
        raise typer.Exit(2) from None
    for i, (t, cert, doc) in enumerate(results):
        where = "all items" if i == 0 else "the items no earlier tier kept"
        if not cert.certified:
            last = i == len(results) - 1
            outcome = ("its answers are served outside the guarantee" if last else
                       "the route cannot be served with --threshold guaranteed at this "
                       "max_error (a middle tier needs a certificate of its own"
                       + ("; --starts 3 may find one" if starts == 1 else "") + ")")
            written = ("document unchanged" if doc is None else
                       f"its older certificate for max_error {max_error:g} removed")
            typer.echo(f"{t.calibration}: tier {i} ({t.name}): nothing certified on {cert.n} "
                       f"{where} at delta {cert.delta:g}: {outcome} ({written})")
            continue
        bound = (f"{max_error:g} at delta {cert.level:g}" if batch is None else
                 f"batch target {cert.target:.4f} at delta {cert.level:g}")
        typer.echo(f"{t.calibration}: tier {i} ({t.name}): threshold {cert.threshold:.4f} "
                   f"certified on {cert.n} {where}: keeps {cert.kept} ({cert.coverage:.1%}), "
                   f"{cert.kept_errors} wrong, upper bound {cert.bound or 0:.4f} <= {bound}")
    if batch is None:
        typer.echo(f"route: with probability >= {1 - delta:g}, answers kept by any tier are "
                   f"wrong at most {max_error:g} of the time on traffic like "
                   f"{data}/calibrate.jsonl")
    else:
        typer.echo(f"route: any one batch of at least {batch} answers kept by the tiers is "
                   f"wrong at most {max_error:g} of the time with probability >= {1 - delta:g}"
                   f" (each tier's kept error rate certified <= its batch target, at half its "
                   f"delta) on traffic like {data}/calibrate.jsonl")

"""Run every reliability script, one after the other, and summarise their verdicts.

Each piece is also runnable alone (`python -m benchmarks.reliability.fuzz`, `.hostile`,
`.feedback_abuse`, `.soak`, `.faults`, `.merge_crash`, `.slow_clients`); each writes its figures to
`benchmarks/reliability/results/NAME.json`. `--quick` runs every piece in its short form
(about 5 minutes plus the vLLM engine kill, which alone takes a few minutes on a CPU); the full
run includes the 10-minute soak.

    python -m benchmarks.reliability [--quick] [--only fuzz,soak] [--skip-engine]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from benchmarks.reliability import (
    faults,
    feedback_abuse,
    fuzz,
    hostile,
    merge_crash,
    slow_clients,
    soak,
)

PIECES: dict[str, Callable[[list[str]], int]] = {
    "fuzz": fuzz.main,
    "hostile": hostile.main,
    "feedback_abuse": feedback_abuse.main,
    "faults": faults.main,
    "merge_crash": merge_crash.main,
    "slow_clients": slow_clients.main,
    "soak": soak.main,
}


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every piece in its short form")
    parser.add_argument("--only", default="", help="comma list of pieces to run")
    parser.add_argument("--skip-engine", action="store_true",
                        help="faults without real vLLM, slow clients over the FAKE")
    parser.add_argument("--soak-minutes", type=float, default=None)
    parser.add_argument("--soak-rate", type=float, default=None)
    args = parser.parse_args(argv)
    chosen = [p for p in (args.only.split(",") if args.only else PIECES) if p]
    console = Console()
    verdicts: dict[str, tuple[int, float]] = {}
    for name in chosen:
        piece_args = ["--quick"] if args.quick else []
        if name == "faults" and args.skip_engine:
            piece_args.append("--skip-engine")
        if name == "slow_clients" and args.skip_engine:
            piece_args.append("--fake")
        if name == "soak" and not args.quick:
            if args.soak_minutes is not None:
                piece_args += ["--minutes", str(args.soak_minutes)]
            if args.soak_rate is not None:
                piece_args += ["--rate", str(args.soak_rate)]
        console.rule(f"{name} {' '.join(piece_args)}")
        t0 = time.perf_counter()
        try:
            code = PIECES[name](piece_args)
        except Exception as exc:  # noqa: BLE001 - one broken piece must not hide the others
            console.print_exception()
            console.print(f"[red]{name} crashed: {exc!r}[/]")
            code = 2
        verdicts[name] = (code, time.perf_counter() - t0)
    table = Table(title="reliability")
    for col in ("piece", "verdict", "seconds"):
        table.add_column(col)
    for name, (code, seconds) in verdicts.items():
        table.add_row(name, "[green]pass[/]" if code == 0 else f"[red]findings ({code})[/]",
                      f"{seconds:.0f}")
    console.print(table)
    console.print("figures: benchmarks/reliability/results/*.json")
    return 0 if all(code == 0 for code, _ in verdicts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

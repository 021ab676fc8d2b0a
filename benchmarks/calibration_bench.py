"""Benchmark of `calibration`: accumulator updates and batch ECE against torchmetrics.

Times, on the same 1,000,000 random (confidence, correct) samples and with several repeats:
- 1,000,000 single-sample `CalibrationAccumulator.update` calls;
- one `CalibrationAccumulator.update_many` call over all samples;
- one `calibration.ece` over all samples, next to torchmetrics' `binary_calibration_error`
  (its defaults, and with `validate_args=False`) on the same data.
Prints a table of medians and writes it into the "## calibration" section of
benchmarks/RESULTS.md (other sections are left untouched). Run:
`.venv/bin/python benchmarks/calibration_bench.py [--n N] [--repeats R] [--no-write]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: benchmarks/ itself is sys.path[0]
    sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_model, mem_gib, utc_now  # noqa: E402
from calibserve.calibration import N_BINS, CalibrationAccumulator, ece  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## calibration"


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Median wall time of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def machine() -> str:
    gib = mem_gib()
    mem = "?" if gib is None else f"{gib:.0f} GiB"
    import torch
    import torchmetrics

    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {mem} RAM, {platform.system()}; "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), torchmetrics {torchmetrics.__version__}; "
        f"{utc_now()}; machine shared with other jobs"
    )


def run(n: int, repeats: int) -> str:
    import torch
    from torchmetrics.functional.classification import binary_calibration_error

    rng = np.random.default_rng(0)
    conf = rng.random(n)
    correct = rng.random(n) < conf**1.5
    conf_list = conf.tolist()
    correct_list = correct.tolist()
    t_conf = torch.from_numpy(conf)
    t_correct = torch.from_numpy(correct.astype(np.int64))

    def single_updates() -> CalibrationAccumulator:
        acc = CalibrationAccumulator()
        update = acc.update
        for c, y in zip(conf_list, correct_list, strict=True):
            update(c, y)
        return acc

    def many_update() -> CalibrationAccumulator:
        acc = CalibrationAccumulator()
        acc.update_many(conf, correct)
        return acc

    rows: list[tuple[str, float]] = []
    single, _ = median_seconds(single_updates, repeats)
    rows.append((f"accumulator: {n:,} single `update` calls", single))
    many, _ = median_seconds(many_update, repeats)
    rows.append((f"accumulator: one `update_many` over {n:,}", many))
    ours, _ = median_seconds(lambda: ece(conf, correct), repeats)
    rows.append((f"`calibration.ece` over {n:,} ({N_BINS} bins, l1)", ours))
    tm, _ = median_seconds(
        lambda: binary_calibration_error(t_conf, t_correct, n_bins=N_BINS, norm="l1"), repeats
    )
    rows.append((f"torchmetrics `binary_calibration_error` over {n:,} (defaults)", tm))
    tm_nv, _ = median_seconds(
        lambda: binary_calibration_error(
            t_conf, t_correct, n_bins=N_BINS, norm="l1", validate_args=False
        ),
        repeats,
    )
    rows.append(
        (f"torchmetrics `binary_calibration_error` over {n:,} (validate_args=False)", tm_nv)
    )

    ours_value = ece(conf, correct)
    tm_value = float(binary_calibration_error(t_conf, t_correct, n_bins=N_BINS, norm="l1"))
    acc_value = single_updates().ece()
    lines = [
        SECTION,
        "",
        f"`.venv/bin/python benchmarks/calibration_bench.py` — medians of {repeats} repeats "
        "(after one warm-up), same float64 data for both libraries.",
        "",
        f"Machine: {machine()}.",
        "",
        "| what | median |",
        "|---|---|",
    ]
    for name, seconds in rows:
        lines.append(f"| {name} | {seconds * 1e3:.1f} ms |")
    lines += [
        "",
        f"- single `update`: {single / n * 1e9:.0f} ns per sample; `update_many`: "
        f"{many / n * 1e9:.1f} ns per sample.",
        f"- batch ECE speed-up over torchmetrics: {tm / ours:.1f}x (defaults), "
        f"{tm_nv / ours:.1f}x (validate_args=False).",
        f"- values agree: ours {ours_value:.9f}, accumulator {acc_value:.9f}, "
        f"torchmetrics {tm_value:.9f}.",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Replace (or append) only the "## calibration" section of RESULTS.md."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == SECTION), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next(
            (j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines)
        )
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    RESULTS.write_text(new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    text = run(args.n, args.repeats)
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

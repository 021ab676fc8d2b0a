"""Run `python -m calibserve.server ARGS` with its garbage collector timed (proxy_cpu.py --gc).

    python benchmarks/gc_timer.py STATS_FILE serve --upstream ... [other server arguments]

`gc.callbacks` times every collection. On SIGUSR1 the process writes STATS_FILE (JSON: seconds
spent collecting so far, collections per generation, objects frozen, resident memory in KiB),
atomically. Standard library only, so any calibserve build's interpreter can run it.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path
from typing import Any

_stats: dict[str, Any] = {"gc_seconds": 0.0, "collections": [0, 0, 0]}
_started = [0.0]


def _timer(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _stats["gc_seconds"] += time.perf_counter() - _started[0]
        _stats["collections"][info["generation"]] += 1


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _write(path: Path) -> None:
    out = {**_stats, "frozen": gc.get_freeze_count(), "rss_kib": _rss_kib()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: gc_timer.py STATS_FILE SERVER_ARGS...")
    path = Path(sys.argv[1])
    gc.callbacks.append(_timer)
    signal.signal(signal.SIGUSR1, lambda *_: _write(path))
    sys.argv = ["calibserve.server", *sys.argv[2:]]
    runpy.run_module("calibserve.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

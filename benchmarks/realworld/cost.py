"""What a step of the real-model runs cost: CPU seconds of this process and everything it started.

    .venv/bin/python -m benchmarks.realworld.cost --record FILE --step NAME -- CMD [ARGS...]

runs CMD and adds one session to the cost record FILE (JSON, written atomically): its wall time,
its CPU time (user + system, every process of its tree: vLLM's engine processes too), its exit
status, the load average when it ended. A step rerun after an interruption adds a session, so a
resumed step's record sums what every attempt cost; `complete` says whether the last one
succeeded. The exit status is CMD's.

CPU of a process tree on Linux: this process (`RUSAGE_SELF`), the children it has reaped
(`RUSAGE_CHILDREN`, which already holds what they reaped in turn), and every live descendant's
own and reaped-children times from /proc. This process makes itself a child subreaper, so a
process orphaned when its parent exits (a vLLM worker whose server was stopped) is reparented
here and reaped here, and its time is not lost. Elsewhere only the first two are counted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import cpu_seconds, descendants
from calibserve.publish import write_atomic

__all__ = ["Measured", "add_session", "become_subreaper", "measure", "read_record",
           "reap_orphans", "tree_cpu_seconds"]

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants reparent to this process (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and of every process it started, live or reaped."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    if Path("/proc/self/stat").is_file():
        total += sum(cpu_seconds(pid, children=True) for pid in descendants(os.getpid()))
    return total


def reap_orphans(timeout_s: float = 30.0) -> int:
    """Wait (at most `timeout_s`) for descendants left behind to exit, reaping them; returns
    how many are still alive. Call it only when every child this process started is done."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        alive = len(descendants(os.getpid())) if Path("/proc/self/stat").is_file() else 0
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


@dataclass
class Measured:
    """Wall and CPU seconds of a `measure` block (filled in when it ends)."""

    started: str = ""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    loadavg_1m: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def session(self) -> dict[str, Any]:
        return {"started": self.started, "wall_s": round(self.wall_s, 2),
                "cpu_s": round(self.cpu_s, 2), "loadavg_1m": round(self.loadavg_1m, 2),
                **self.extra}


@contextlib.contextmanager
def measure() -> Iterator[Measured]:
    """Measure the block: wall time and the CPU time of this process tree spent in it."""
    m = Measured(started=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))
    t0, c0 = time.monotonic(), tree_cpu_seconds()
    try:
        yield m
    finally:
        m.wall_s = time.monotonic() - t0
        m.cpu_s = max(0.0, tree_cpu_seconds() - c0)
        m.loadavg_1m = os.getloadavg()[0]


def read_record(path: Path) -> dict[str, Any] | None:
    """A cost record, or None when there is none (or it is unreadable)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("sessions"), list) else None


def add_session(path: Path, step: str, session: dict[str, Any], complete: bool,
                command: Sequence[str] | None = None) -> dict[str, Any]:
    """Append one session to the record at `path` (created if missing); totals recomputed."""
    doc = read_record(path) or {"step": step, "sessions": []}
    doc["step"] = step
    if command is not None:
        doc["command"] = list(command)
    doc["sessions"].append(session)
    doc["wall_s"] = round(sum(float(s.get("wall_s", 0)) for s in doc["sessions"]), 2)
    doc["cpu_s"] = round(sum(float(s.get("cpu_s", 0)) for s in doc["sessions"]), 2)
    doc["cpu_minutes"] = round(doc["cpu_s"] / 60, 2)
    doc["complete"] = complete
    write_atomic(Path(path), json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("error: usage: python -m benchmarks.realworld.cost --record FILE --step NAME "
              "-- CMD [ARGS...]", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m benchmarks.realworld.cost",
                                description="Run a command and record what it cost.")
    p.add_argument("--record", type=Path, required=True, help="the cost record (JSON) to add to")
    p.add_argument("--step", required=True, help="what the command is (merge, tune, ...)")
    args = p.parse_args(argv[:cut])
    cmd = argv[cut + 1:]
    if not cmd:
        p.error("no command after --")
    if args.record.is_dir():
        p.error(f"--record: {args.record} is a directory")
    become_subreaper()
    rc = 1
    with measure() as m:
        try:
            rc = subprocess.call(cmd)
        except KeyboardInterrupt:
            rc = 130
        except OSError as exc:
            print(f"error: cannot run {cmd[0]}: {exc}", file=sys.stderr)
            rc = 127
        m.extra["left_running"] = reap_orphans()
        m.extra["rc"] = rc
    add_session(args.record, args.step, m.session(), rc == 0, cmd)
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Where a managed engine's output goes: its own log file in the run's state directory.

vLLM prints a few hundred lines while it starts (banners, warnings, its arguments) and, while it is
busy, a statistics line every 10 s; relayed to calibserve's console line by line they buried what
calibserve itself says. So each managed engine writes to `engine-NAME.log` in this run's directory
(`$CALIBSERVE_HOME/runs/<UTC time>-<pid>/`, or the engine's `log_dir`), and calibserve's console
gets its own lines about it: starting (with the file's path, once), ready after N s, and, when it
fails or exits, its last lines and the path again. `console: true` in the engine's settings
(`calibserve serve --engine-console`) relays the output to the console as well, for debugging.

A run directory is created by the first engine that starts; the newest `KEEP_RUNS` under
`$CALIBSERVE_HOME/runs` are kept, older ones whose process has exited are removed then.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO

from calibserve.server.config import ServerSettings, TierSettings

RUNS_DIR = "runs"
KEEP_RUNS = 20
TAIL_BYTES = 64 * 1024  # enough for vLLM's longest start-up traceback
_RUN_NAME = re.compile(r"^\d{8}-\d{6}-(\d+)$")
# The line a Python traceback ends with: `pkg.mod.SomeError: message`.
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit)):?\s*(.*)$")
MAX_REASON = 300
# calibserve's own lines in the file: one per start (what ran), one per event (an exit).
START = "=== calibserve start "
NOTE = "=== calibserve "


def calibserve_home() -> Path:
    """`$CALIBSERVE_HOME`, default `./.calibserve` (where the demo caches its world too)."""
    return Path(os.environ.get("CALIBSERVE_HOME", ".calibserve"))


@functools.cache
def run_dir() -> Path:
    """This process's state directory (a path only: the first engine log creates it)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return (calibserve_home() / RUNS_DIR / f"{stamp}-{os.getpid()}").absolute()


def log_path(name: str, log_dir: Path | None = None) -> Path:
    """The log file of the engine called `name`: in `log_dir`, else in this run's directory."""
    safe = re.sub(r"[^\w.-]+", "_", name).strip("._") or "engine"
    return Path(log_dir if log_dir is not None else run_dir()) / f"engine-{safe}.log"


def engine_output(settings: ServerSettings, console: bool = False, log_dir: Path | None = None
                  ) -> ServerSettings:
    """`settings` with every managed engine's output relayed to the console (`console`) and its
    log file in `log_dir` (`calibserve serve --engine-console --engine-log-dir DIR`); an
    engine's own `console: true` stays when `console` is false."""
    update: dict[str, Any] = {}
    if console:
        update["console"] = True
    if log_dir is not None:
        update["log_dir"] = log_dir
    if not update:
        return settings

    def engine(tier: TierSettings) -> dict[str, Any]:
        return {"engine": tier.engine.model_copy(update=update)} if tier.managed else {}

    models = [model.model_copy(update={**engine(model), "escalate_to": [
        tier.model_copy(update=engine(tier)) for tier in model.escalate_to]})
        for model in settings.models]
    return settings.model_copy(update={"models": models})


def shown(path: Path) -> str:
    """A path as printed: relative to the working directory when it is under it."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune_runs(root: Path, keep: int = KEEP_RUNS) -> list[Path]:
    """Remove run directories under `root` beyond the newest `keep`, unless their process is
    alive; only names this module gives (`YYYYmmdd-HHMMSS-PID`) are touched. Returns them."""
    try:
        runs = sorted(p for p in root.iterdir() if p.is_dir() and _RUN_NAME.match(p.name))
    except OSError:
        return []
    removed = []
    for old in runs[:-keep] if keep > 0 else runs:
        match = _RUN_NAME.match(old.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


def _exception_reason(lines: list[str], i: int, match: re.Match[str]) -> str:
    text = f"{match.group(1)}: {match.group(2)}".rstrip(": ")
    # pydantic (vLLM's argument checks) puts what was wrong on the indented line that follows.
    if i + 1 < len(lines) and lines[i + 1][:1].isspace() and lines[i + 1].strip():
        text += f": {lines[i + 1].strip()}"
    return text


def failure_reason(lines: list[str]) -> str | None:
    """The line of an engine's last output that says why it failed: the last exception line
    (one that only points at a root cause above yields to an earlier one), else None."""
    found: str | None = None
    for i in range(len(lines) - 1, -1, -1):
        match = _EXCEPTION.match(lines[i])
        if match is None or not match.group(2):
            continue
        reason = _exception_reason(lines, i, match)
        if "root cause above" not in reason.lower():
            found = reason
            break
        found = found or reason
    if found is not None and len(found) > MAX_REASON:
        found = found[: MAX_REASON - 3] + "..."
    return found


class EngineLog:
    """One engine's log file: opened (appending) at each start, read back when it fails."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def open(self, header: str) -> BinaryIO:
        """The file, appending, with a header line for this start: the child writes to it."""
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(parents=True, exist_ok=True)
            if directory == run_dir():
                prune_runs(directory.parent, KEEP_RUNS)
        handle = self.path.open("ab", buffering=0)
        handle.write(self._stamped(START, header))
        return handle

    def note(self, text: str) -> None:
        """A line of calibserve's own in the file (an exit, a restart): readable in order."""
        with contextlib.suppress(OSError), self.path.open("ab", buffering=0) as handle:
            handle.write(self._stamped(NOTE, text))

    @staticmethod
    def _stamped(mark: str, text: str) -> bytes:
        return f"{mark}{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: {text}\n".encode()

    def tail(self, lines: int = 30) -> list[str]:
        """The last `lines` lines the engine wrote since its latest start (calibserve's own
        lines left out)."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - TAIL_BYTES))
                data = handle.read()
        except OSError:
            return []
        text = data.decode(errors="replace").splitlines()
        if size > TAIL_BYTES:
            text = text[1:]  # the first line read is probably cut
        kept: list[str] = []
        for line in text:
            if line.startswith(START):
                kept = []  # an earlier start's output is not this one's
            elif not line.startswith(NOTE):
                kept.append(line.rstrip())
        return kept[-lines:] if lines > 0 else []

    def reason(self) -> str | None:
        """Why the engine failed, as one line, from its last output (`failure_reason`)."""
        return failure_reason(self.tail(400))

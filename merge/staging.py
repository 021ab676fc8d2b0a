"""Where a merge into OUT works until it is complete, who may work there, and how it becomes OUT.

Everything goes to a sibling staging directory `.{OUT}.partial/`, which also holds the per-point
sweep cache, so rerunning the same command after a kill resumes there. A lock inside it keeps a
second run into the same OUT out (refused, not queued). Only when the model, calibration.json and
report are complete is the staging directory renamed to OUT: OUT never looks complete when it is
not. The lock and the rename are `calibserve.publish`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from calibserve.merge.errors import OutputExists
from calibserve.publish import Busy, exclusive, publish_dir

__all__ = ["LOCK", "publish", "running", "staging_dir"]

LOCK = ".lock"  # inside the staging directory; removed just before it is renamed to OUT


def staging_dir(out: Path) -> Path:
    """Where a run into `out` works until it is complete (and where a killed run resumes)."""
    return out.parent / f".{out.name}.partial"


@contextmanager
def running(work: Path) -> Iterator[None]:
    """This run's exclusive hold on the staging directory `work` (created if missing)."""
    work.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        try:
            stack.enter_context(exclusive(work / LOCK, wait=False))
        except Busy as exc:
            raise OutputExists(f"another merge is running into {work}", "--out") from exc
        yield


def publish(work: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished staging directory to `out` (replacing an old `out` if allowed)."""
    (work / LOCK).unlink(missing_ok=True)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{out} appeared while merging", "--out")
    publish_dir(work, out)

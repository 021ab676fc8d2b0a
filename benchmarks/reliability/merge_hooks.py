"""Run `calibserve merge` with test-only pause points and an event log (no change to merge/).

merge/ has no hook to stop at a chosen moment, and on tiny checkpoints the write and the final
rename last milliseconds, so killing "during the write" by timing alone is luck. This wrapper
patches, in its own process only, the functions the pipeline calls at those moments:

- `RELIABILITY_MERGE_PAUSE=sweep:N`: after the N-th sweep point is cached, announce and sleep;
- `RELIABILITY_MERGE_PAUSE=write`: after the first tensor bytes of the model are written;
- `RELIABILITY_MERGE_PAUSE=rename`: just before the staging directory is renamed to OUT;
- `RELIABILITY_MERGE_LOG=FILE`: JSON lines `{"event": "cache_hit"|"computed", "split", "lambda"}`
  so a rerun can be checked to resume from the sweep cache.

A pause writes `{"paused": POINT}` to `RELIABILITY_MERGE_LOG` and sleeps up to 120 s, so the
harness can SIGKILL the process at exactly that point.

    RELIABILITY_MERGE_PAUSE=write python -m benchmarks.reliability.merge_hooks merge --base ...
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PAUSE_S = 120.0


def _log(event: dict[str, Any]) -> None:
    path = os.environ.get("RELIABILITY_MERGE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _pause(point: str) -> None:
    _log({"paused": point, "pid": os.getpid()})
    time.sleep(PAUSE_S)


def install() -> None:
    import calibserve.merge.sweep
    import calibserve.merge.writer

    pause = os.environ.get("RELIABILITY_MERGE_PAUSE", "")
    cache_cls = calibserve.merge.sweep.ResultCache
    real_get, real_put = cache_cls.get, cache_cls.put
    puts = {"n": 0}

    def get(self: Any, split: str, lam: float) -> Any:
        point = real_get(self, split, lam)
        if point is not None:
            _log({"event": "cache_hit", "split": split, "lambda": lam})
        return point

    def put(self: Any, split: str, point: Any) -> None:
        real_put(self, split, point)
        puts["n"] += 1
        _log({"event": "computed", "split": split, "lambda": point.lam})
        if pause.startswith("sweep:") and puts["n"] == int(pause.split(":", 1)[1]):
            _pause("sweep")

    cache_cls.get, cache_cls.put = get, put  # type: ignore[method-assign]

    if pause == "write":
        real_write = calibserve.merge.writer.write_tensor_bytes
        written = {"n": 0}

        def write_tensor_bytes(f: Any, tensor: Any) -> None:
            real_write(f, tensor)
            written["n"] += 1
            if written["n"] == 1:
                f.flush()  # what a kill would leave on disk
                _pause("write")

        calibserve.merge.writer.write_tensor_bytes = write_tensor_bytes  # type: ignore[assignment]

    if pause == "rename":
        real_rename = os.rename

        def rename(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
            # The publish step renames `.OUT.partial` to OUT: stop right before it.
            if Path(src).name.endswith(".partial"):
                _pause("rename")
            real_rename(src, dst, *a, **kw)

        os.rename = rename  # type: ignore[assignment]


def main() -> None:
    install()
    from calibserve.cli import main as calibserve_main

    sys.argv = ["calibserve", *sys.argv[1:]]
    calibserve_main()


if __name__ == "__main__":
    main()

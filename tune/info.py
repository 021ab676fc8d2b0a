"""`train_info.json`: what was trained, on what, how long it took and where.

The recipe (every setting, with the learning rate, LoRA scale and step counts resolved), the
data (each file's sha256, examples and tokens by kind), the parameters trained, a summary of the
per-step loss and every step's loss, the wall time and the CPU minutes summed over every session
that trained the run, the device and the library versions.
"""

from __future__ import annotations

import platform
import statistics
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import torch

__all__ = ["loss_summary", "versions", "FORMAT"]

FORMAT = 1


def loss_summary(losses: list[float]) -> dict[str, Any]:
    """First and last step, the mean of the first and last tenth, the minimum, every step."""
    if not losses:
        return {"steps": 0}
    tenth = max(1, len(losses) // 10)
    return {
        "steps": len(losses),
        "first": round(losses[0], 5),
        "last": round(losses[-1], 5),
        "mean_first_tenth": round(statistics.fmean(losses[:tenth]), 5),
        "mean_last_tenth": round(statistics.fmean(losses[-tenth:]), 5),
        "min": round(min(losses), 5),
        "per_step": [round(v, 5) for v in losses],
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {
        "calibserve": _version("calibserve"),
        "torch": str(torch.__version__),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "python": platform.python_version(),
    }


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

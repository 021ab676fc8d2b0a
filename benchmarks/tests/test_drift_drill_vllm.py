"""The fault drill (benchmarks/drift_drill.py) in short, on a real vLLM engine: the merged demo
model served under its calibration.json with the map broken (a sharpening temperature,
`sharpened_calibration`: a fault of the same size on every build of the demo world, where the
benchmark's aligned-checkpoint fault is not). Probes show the drift, shadow reports a better
candidate, `on` swaps it in, live ECE falls below the alert level, the API keeps its shape. (The
benchmark also times the real Prometheus alert and compares with an offline fit.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.drift_drill import run_drill, sharpened_calibration


@pytest.mark.vllm
def test_drift_is_seen_and_recalibration_fixes_it(
    merged_dir: Path, vllm_server: Callable[[Path, str], str]
) -> None:
    model = merged_dir / "model"
    url = vllm_server(model, "merged")
    broken = sharpened_calibration(model / "calibration.json")
    r = run_drill(model, broken, model / "probes.jsonl",
                  rate=3000, after_swap=300, timeout_s=150, upstream=url,
                  upstream_model="merged", log=lambda _: None,
                  recal_kwargs={"window": 600, "min_samples": 400, "every": 50})
    # The fault is visible to probes: ECE well above the recorded baseline (the larger of the fit
    # and held-out ECE). The margin is below the alert's 0.05 so that 400 probes' sampling noise
    # cannot fail the test; the benchmark times the real alert.
    assert r["probe_ece_before_swap"] > r["fit_ece"] + 0.03, r
    shadow = r["shadow"]
    assert shadow["candidate_ece"] < shadow["current_ece"] - 0.02, r
    assert r["swap_s"] is not None and r["swap_s"] >= shadow["at_s"], r
    assert r["probes_after_swap"] == 300
    assert r["live_ece_after_swap"] < r["alert_level_after"], r
    assert r["live_ece_after_swap"] < r["probe_ece_before_swap"] - 0.05, r
    assert r["api_shape_unchanged"] is True

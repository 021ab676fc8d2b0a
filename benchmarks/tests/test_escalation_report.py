"""The escalation benchmark's --report-only path: per-item records from a run directory, only
summary.json and the plot beside the script, and the free-form benchmark reading that summary."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from benchmarks.escalation import run
from benchmarks.freeform.run import escalation_mc_ece


def answers(rng: random.Random, n: int, p: float) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        score = rng.random()
        out.append({"letter": "A", "correct": rng.random() < p * (0.5 + score), "score": score,
                    "raw": score, "served_by": "merged", "escalated": False})
    return out


def test_report_only_reads_the_raw_records_and_commits_only_a_summary(tmp_path: Path) -> None:
    rng = random.Random(0)
    n = 40
    raw = {"via": "test", "demo_dir": "demo", "demo_digest": "abc", "merged_model": "m",
           "calibration": {"version": 2, "multiple_choice": "answer", "methods": {"answer": {}}},
           "threshold_20": 0.2, "machine": "test machine",
           "long_tail": [i % 4 == 0 for i in range(n)], "wall_seconds": 1.0,
           "date": "2026-12-07 00:00 UTC",
           "items": {"merged": answers(rng, n, 0.7), "aligned": answers(rng, n, 0.6),
                     "expert": answers(rng, n, 0.9), "live_20": answers(rng, n, 0.7)}}
    raw_path = tmp_path / "home" / "results.json"
    raw_path.parent.mkdir()
    raw_path.write_text(json.dumps(raw))
    out, md = tmp_path / "out", tmp_path / "RESULTS.md"
    assert run.main(["--report-only", "--raw", str(raw_path), "--out", str(out),
                     "--results-md", str(md)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["escalation.png", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == n and summary["demo_digest"] == "abc"
    assert set(summary["curves"]) == set(run.NAMES) and summary["rates"] == run.RATES
    expected = run.ece_of([a["score"] for a in raw["items"]["merged"]],
                          [a["correct"] for a in raw["items"]["merged"]])
    assert summary["merged_served_ece"] == pytest.approx(expected)
    assert "`benchmarks/escalation/summary.json`" in md.read_text()
    # benchmarks/freeform compares its MC ECE with the summary (or with the raw records).
    assert escalation_mc_ece(out / "summary.json", "abc") == pytest.approx(expected)
    assert escalation_mc_ece(raw_path, "abc") == pytest.approx(expected)
    assert escalation_mc_ece(out / "summary.json", "another build") is None

"""One merge killed mid-write (tiny random Llama pair): no complete-looking OUT, rerun resumes."""

from __future__ import annotations

from pathlib import Path

from benchmarks.reliability.merge_crash import build_world, kill_at, verdict


def test_merge_killed_during_write_resumes(tmp_path: Path) -> None:
    world = build_world(tmp_path / "world")
    result = kill_at(world, tmp_path, "write")
    assert result["killed"] and result["killed_at"] == "write", result
    after = result["after_kill"]
    assert not after["out_exists"] and not after["out_looks_complete"], result
    assert after["staging_model_tmp"], result  # the kill really was mid-write
    assert result["rerun_computed"] == 0 and result["rerun_cache_hits"] >= after["cached_points"]
    assert verdict(result), result

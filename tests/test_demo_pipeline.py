"""calibserve.demo_pipeline: the demo's merge and expert calibration, cached next to the world."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import calibserve.demo_pipeline as demo_pipeline
from calibserve.demo_pipeline import DEMO_MERGE_SETTINGS, calibrate_demo_expert, merge_demo
from calibserve.merge.config import MergeConfig


def _fake_world(root: Path) -> Path:
    world = root / "world"
    for sub, name in (("base", "model.safetensors"), ("aligned", "model.safetensors"),
                      ("data", "select.jsonl"), ("data", "calibrate.jsonl")):
        (world / sub).mkdir(parents=True, exist_ok=True)
        (world / sub / name).write_text(f"{sub}/{name}")
    return world


def test_merge_demo_merges_once_per_world_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = _fake_world(tmp_path)
    runs: list[MergeConfig] = []

    def fake_run_merge(config: MergeConfig, progress: bool = True) -> Path:
        runs.append(config)
        (config.out / "model").mkdir(parents=True, exist_ok=True)
        (config.out / "model" / "calibration.json").write_text("{}")
        return config.out

    monkeypatch.setattr(demo_pipeline, "run_merge", fake_run_merge)
    out = merge_demo(world)
    assert merge_demo(world) == out and len(runs) == 1  # the second call reuses the merge
    assert out.parent == tmp_path and out.name.startswith("merged-world-")
    (config,) = runs
    assert config.out == out and config.overwrite and config.data == world / "data"
    assert {k: getattr(config, k) for k in ("method", "refine", "select", "calibrator")} == {
        k: DEMO_MERGE_SETTINGS[k] for k in ("method", "refine", "select", "calibrator")
    }
    # An unfinished merge (no calibration.json) is merged again into the same place.
    (out / "model" / "calibration.json").unlink()
    assert merge_demo(world) == out and len(runs) == 2
    # Changed inputs are a different world: a new key, a new directory.
    data = world / "data" / "select.jsonl"
    data.write_text("changed")
    os.utime(data, ns=(1, 1))
    assert merge_demo(world) != out and len(runs) == 3


@pytest.mark.slow
def test_the_demo_expert_calibration_is_cached_next_to_the_world(demo_dir: Path) -> None:
    first = calibrate_demo_expert(demo_dir)
    stamp = first.stat().st_mtime_ns
    assert first.parent == demo_dir.resolve().parent and first.is_file()
    assert calibrate_demo_expert(demo_dir) == first
    assert first.stat().st_mtime_ns == stamp  # not fitted again
    assert not (demo_dir / "expert" / "calibration.json").exists()  # the world stays as built
    assert json.loads(first.read_text())["merge"] is None

"""calibserve.demo_pipeline: the demo's merge, expert calibration and free-form fit, cached next
to the world."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import pytest

import calibserve.demo_pipeline as demo_pipeline
from calibserve.calibration import CalibrationDocument
from calibserve.calibration.mc_prompt import offers_options
from calibserve.demo_pipeline import (
    DEMO_MERGE_SETTINGS,
    calibrate_demo_expert,
    merge_demo,
    served_demo_model,
)
from calibserve.fit.methods import FREE_FORM_FIT_METHODS
from calibserve.fit.passes import Reply, ServedPass
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


def _fake_merge(root: Path) -> Path:
    """A merge's output as served_demo_model reads it: model/ with weights and a document."""
    model = root / "merged" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_text("weights")
    CalibrationDocument.from_dict({
        "version": 2, "methods": {"answer": {}, "mean": {}}, "multiple_choice": "answer",
        "free_form": "mean",
    }).write(model)
    return model.parent


def test_served_demo_model_fits_free_form_once_beside_the_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = _fake_world(tmp_path)
    merged = _fake_merge(tmp_path)
    rng = random.Random(0)
    for split in ("calibrate", "test"):
        rows = [{"question": f"what is the color of the e{i} ?", "answer": "red"}
                for i in range(60)]
        (world / "data" / f"short_{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    for split in ("calibrate", "test"):  # multiple-choice items, asked in the same pass
        rows = [{"question": f"what is the color of the e{i} ?", "choices": ["red", "blue"],
                 "answer": 0} for i in range(40)]
        (world / "data" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    asked: list[int] = []

    def fake_serve(questions: list[str], calibrations: list[Path], **kw: Any
                   ) -> list[ServedPass]:
        # A stand-in for the engine: confident replies are right more often, but less often than
        # they claim (so a calibrator is chosen over the identity). Multiple-choice prompts are
        # answered with a word first every other time (served by no_letter), else a letter.
        asked.append(len(questions))
        assert calibrations == [merged / "model" / "calibration.json"]
        out = []
        for _ in questions:
            p = rng.uniform(0.2, 0.99)
            text = "red" if rng.random() < p - 0.2 else "blue"
            out.append(Reply(text, {"method": "none"},
                             {"content": [{"token": text, "logprob": math.log(p)}]}))
        for i, prompt in enumerate(kw["mc_questions"]):
            assert offers_options(prompt)
            lp = {"content": [{"token": "the", "logprob": -0.3}]}
            raw = math.exp(-0.3)
            out.append(Reply("the red one", {"method": "no_letter", "raw": raw, "score": raw},
                             lp) if i % 2 else Reply("A", {"method": "answer"}, lp))
        return [ServedPass(out, {})]

    monkeypatch.setattr(demo_pipeline, "serve_passes", fake_serve)
    served = served_demo_model(world, merged)
    assert asked == [120] and served.parent == tmp_path and served.name.startswith("served-world-")
    assert (served / "model.safetensors").read_text() == "weights"
    doc = CalibrationDocument.load(served)
    assert doc.method(doc.free_form).calibrated and doc.free_form in FREE_FORM_FIT_METHODS
    assert doc.metrics["short_answer"]["test"]["n"] == 60
    # no_letter: fitted on the 20 letterless calibrate replies (all wrong), reported on test.
    no_letter = doc.method("no_letter")
    assert no_letter.calibrated and no_letter.fit is not None and no_letter.fit.n == 20
    assert doc.metrics["no_letter"]["test"]["n"] == 20
    # The merge's own document stays as the merge wrote it.
    assert CalibrationDocument.load(merged / "model").free_form == "mean"
    assert not CalibrationDocument.load(merged / "model").method("mean").calibrated
    assert served_demo_model(world, merged) == served and asked == [120]  # cached
    (world / "data" / "short_calibrate.jsonl").write_text(
        json.dumps({"question": "q ?", "answer": "red"}) + "\n" * 1)
    os.utime(world / "data" / "short_calibrate.jsonl", ns=(1, 1))
    assert served_demo_model(world, merged) != served and asked == [120, 61]  # new data: refit

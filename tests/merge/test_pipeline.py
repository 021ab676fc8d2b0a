"""The whole merge on a tiny pair: outputs, schema, atomicity, refusals, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibserve.calibration import (
    DEFAULT_TARGET_ACCURACIES,
    CalibrationDocument,
    Scorer,
    calibrator_from_dict,
)
from calibserve.merge.config import MergeConfig
from calibserve.merge.errors import (
    IncompatibleCheckpoints,
    InvalidConfig,
    InvalidData,
    MergeError,
    OutputExists,
)
from calibserve.merge.evaluate import MCEvaluator
from calibserve.merge.pipeline import run_merge, staging_dir
from tests.merge.conftest import write_raw_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _config(world: dict[str, Path], out: Path, **kw: Any) -> MergeConfig:
    settings: dict[str, Any] = {
        "base": str(world["base"]),
        "aligned": str(world["aligned"]),
        "data": world["data"],
        "out": out,
    }
    return MergeConfig(**{**settings, **kw})


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def merged(tiny_world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "out"
    return run_merge(
        _config(tiny_world, out, grid="0:1:0.25", diversity=True, shard_size="100KB",
                calibrator="temperature"),  # one family forced: `auto` has its own tests
        progress=False,
    )


def test_output_layout_and_report(merged: Path) -> None:
    assert not staging_dir(merged).exists()
    model = merged / "model"
    for f in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
        "calibration.json",
        "model.safetensors.index.json",
    ):
        assert (model / f).is_file(), f
    report = json.loads((merged / "report.json").read_text())
    lams = [p["lambda"] for p in report["points"]]
    assert lams == sorted(lams) and {0.0, 0.25, 0.5, 0.75, 1.0} <= set(lams)
    for p in report["points"]:
        assert {"accuracy", "ece", "brier", "nll", "mean_confidence", "diversity"} <= set(p)
        assert set(p["diversity"]) == {"distinct_1", "distinct_2", "pairwise_jaccard"}
    sel = report["selected"]
    assert sel["rule"] == "max-accuracy" and sel["on_frontier"]
    assert sel["lambda"] in report["pareto_lambdas"] and sel["reason"]
    assert sel["metrics"]["accuracy"] == max(p["accuracy"] for p in report["points"])
    assert report["parents"]["base"].endswith("base")
    assert set(report["heldout"]["models"]) == {
        "base",
        "aligned",
        "selected",
        "selected+calibrator",
    }
    for png in ("metrics_vs_lambda.png", "pareto_plane.png", "reliability.png"):
        assert (merged / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (merged / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and 'src="http' not in html
    card = (model / "README.md").read_text()
    assert f"lambda = {sel['lambda']:g}" in card and "base" in card


def test_calibration_json_schema_and_scorer(merged: Path) -> None:
    cal = json.loads((merged / "model" / "calibration.json").read_text())
    assert cal["version"] == 2
    assert (cal["multiple_choice"], cal["free_form"]) == ("answer", "mean")
    assert set(cal["methods"]) == {"answer", "mean"}
    answer = cal["methods"]["answer"]
    assert answer["params"] == {"options": ["A", "B", "C", "D"], "temperature": 1.0}
    assert answer["calibrator"]["type"] == "temperature"
    calibrator_from_dict(answer["calibrator"])
    # The calibrator was fitted on option-letter scores: `mean` has none of its own.
    assert cal["methods"]["mean"] == {"params": {}, "calibrator": None, "thresholds": [],
                                      "fit": None}
    report = json.loads((merged / "report.json").read_text())
    assert cal["merge"] == {
        "lambda": report["selected"]["lambda"],
        "method": "linear",
        "base": report["parents"]["base"],
        "aligned": report["parents"]["aligned"],
        "rule": "max-accuracy",
    }
    calib = answer["fit"]
    assert {"ece_raw", "ece_calibrated", "n", "accuracy"} <= set(calib) and calib["n"] == 24
    assert calib["calibrator"] == "temperature"
    assert calib["accuracy"] == report["calibration"]["calibrate"]["accuracy"]
    assert "calibrate" not in cal["metrics"] and "select" in cal["metrics"]
    # Every target is either a threshold or listed as unreachable.
    reached = {t["target_accuracy"] for t in answer["thresholds"]}
    assert reached | set(calib.get("unreachable_targets", [])) == set(DEFAULT_TARGET_ACCURACIES)
    for t in answer["thresholds"]:
        assert 0.0 <= t["threshold"] <= 1.0 and 0.0 < t["coverage"] <= 1.0
    # It loads through the one loader, and is exactly what the writer writes.
    doc = CalibrationDocument.load(merged / "model")
    assert doc.to_dict() == cal
    assert (merged / "model" / "calibration.json").read_text() == doc.to_json()
    scorer = Scorer.from_document(doc)
    assert scorer.method == "answer" and scorer.options == ("A", "B", "C", "D")
    assert scorer.multiple_choice.calibrated and not scorer.free_form.calibrated


def test_thresholds_use_the_calibrated_confidence(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    from calibserve.calibration import threshold_for_accuracy

    out = run_merge(
        _config(tiny_world, tmp_path / "o", grid="0,1", refine=False, target_accuracy=[0.3, 0.35],
                calibrator="temperature"),
        progress=False,
    )
    cal = json.loads((out / "model" / "calibration.json").read_text())
    # Recompute from the cached calibrate-split point at the chosen lambda.
    lam = cal["merge"]["lambda"]
    point = next((out / "sweep").rglob(f"calibrate-lambda{lam:+.6f}.json"))
    scores = json.loads(point.read_text())["scores"]
    answer = cal["methods"]["answer"]
    calibrated = calibrator_from_dict(answer["calibrator"]).apply(scores["confidence"])
    for t in answer["thresholds"]:
        want = threshold_for_accuracy(calibrated, scores["correct"], t["target_accuracy"])
        assert t["threshold"] == pytest.approx(want["threshold"])


def test_merged_model_loads_and_scores_like_the_sweep(
    merged: Path, tiny_world: dict[str, Path]
) -> None:
    report = json.loads((merged / "report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(merged / "model", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged / "model")
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_world["aligned"]).chat_template
    items = [json.loads(line) for line in (tiny_world["data"] / "select.jsonl").open()]
    scores = MCEvaluator(tok, items).score(model)
    sel = report["selected"]["metrics"]
    assert float(scores.correct.mean()) == pytest.approx(sel["accuracy"])
    assert float(scores.confidence.mean()) == pytest.approx(sel["mean_confidence"], abs=1e-6)


def test_refusals_write_nothing(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    bad_data = tmp_path / "bad-data"
    bad_data.mkdir()
    (bad_data / "select.jsonl").write_text((tiny_world["data"] / "select.jsonl").read_text())
    odd = write_raw_checkpoint(
        tmp_path / "odd",
        {"w": torch.zeros(3)},
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
    )
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    cases: list[tuple[dict[str, Any], type[MergeError], str]] = [
        ({"data": bad_data}, InvalidData, "--data"),  # no calibrate.jsonl
        ({"data": tmp_path / "missing"}, InvalidData, "--data"),
        ({"aligned": str(odd)}, IncompatibleCheckpoints, "--aligned"),
        ({"base": str(tmp_path / "nope")}, MergeError, "--base"),
        ({"out": full}, OutputExists, "--out"),
        # the tiny world has no short answers: nothing for a free-form objective to judge
        ({"select": "free-form:knee"}, InvalidConfig, "--select"),
    ]
    before = _tree(tmp_path)
    for kw, exc, flag in cases:
        cfg = _config(tiny_world, tmp_path / "out", **{k: v for k, v in kw.items() if k != "out"})
        if "out" in kw:
            cfg = cfg.model_copy(update={"out": kw["out"]})
        with pytest.raises(exc) as err:
            run_merge(cfg, progress=False)
        assert err.value.param == flag, (kw, err.value)
        assert _tree(tmp_path) == before, kw


def test_overwrite_replaces_an_existing_out(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old")
    run_merge(_config(tiny_world, out, grid="0,1", refine=False, overwrite=True), progress=False)
    assert not (out / "old.txt").exists() and (out / "model" / "calibration.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
import calibserve.merge.evaluate as ev
real = ev.MCEvaluator.score
def slow(self, model):
    time.sleep(0.4)  # make the sweep slow enough to be killed in the middle
    return real(self, model)
ev.MCEvaluator.score = slow
from calibserve.merge.config import MergeConfig
from calibserve.merge.pipeline import run_merge
run_merge(MergeConfig(base={base!r}, aligned={aligned!r}, data={data!r}, out={out!r},
                      grid="0:1:0.1", refine=False), progress=False)
"""


@pytest.mark.slow
def test_a_killed_run_resumes(
    tiny_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    script = KILL_SCRIPT.format(
        repo=str(REPO),
        base=str(tiny_world["base"]),
        aligned=str(tiny_world["aligned"]),
        data=str(tiny_world["data"]),
        out=str(out),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    cache = staging_dir(out) / "sweep"
    deadline = time.monotonic() + 120
    try:
        while len(list(cache.rglob("select-*.json"))) < 3:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "sweep did not start"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = len(list(cache.rglob("select-*.json")))
    assert 3 <= done_before < 11
    assert not out.exists()  # a killed run never leaves OUT behind
    import calibserve.merge.evaluate as ev

    calls: list[int] = []
    real = ev.MCEvaluator.score

    def counting(self: MCEvaluator, model: torch.nn.Module) -> Any:
        calls.append(len(self.items))
        return real(self, model)

    monkeypatch.setattr(ev.MCEvaluator, "score", counting)
    run_merge(
        MergeConfig(
            base=str(tiny_world["base"]),
            aligned=str(tiny_world["aligned"]),
            data=tiny_world["data"],
            out=out,
            grid="0:1:0.1",
            refine=False,
        ),
        progress=False,
    )
    report = json.loads((out / "report.json").read_text())
    held = {0.0, 1.0, report["selected"]["lambda"]}
    # select points not cached + the calibrate point + the held-out (test) points.
    assert len(calls) == (11 - done_before) + 1 + len(held)
    fresh = run_merge(
        MergeConfig(
            base=str(tiny_world["base"]),
            aligned=str(tiny_world["aligned"]),
            data=tiny_world["data"],
            out=tmp_path / "fresh",
            grid="0:1:0.1",
            refine=False,
        ),
        progress=False,
    )
    report2 = json.loads((fresh / "report.json").read_text())
    strip = ("seconds",)
    assert [{k: v for k, v in p.items() if k not in strip} for p in report["points"]] == [
        {k: v for k, v in p.items() if k not in strip} for p in report2["points"]
    ]
    assert report["selected"]["lambda"] == report2["selected"]["lambda"]
    assert sorted(os.listdir(tmp_path)) == ["fresh", "out"]  # no staging left behind


def test_concurrent_run_into_the_same_out_is_refused(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    import fcntl

    out = tmp_path / "o"
    work = staging_dir(out)
    work.mkdir()
    with open(work / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(OutputExists, match="another merge"):
            run_merge(_config(tiny_world, out, grid="0,1"), progress=False)


@pytest.fixture(scope="module")
def merged_short(tiny_world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merge whose data holds short answers too, selected on the combined objective."""
    import shutil

    from tests.merge.conftest import write_short_answers

    root = tmp_path_factory.mktemp("merged-short")
    data = write_short_answers(Path(shutil.copytree(tiny_world["data"], root / "data")))
    return run_merge(
        _config({**tiny_world, "data": data}, root / "out", grid="0:1:0.5",
                select="combined:knee", max_new_tokens=4, calibrator="temperature"),
        progress=False,
    )


def test_short_answers_are_scored_at_every_lambda_and_can_select(merged_short: Path) -> None:
    report = json.loads((merged_short / "report.json").read_text())
    assert report["version"] == 2 and report["short_answer_splits"] == {"select": 12, "test": 12}
    assert report["free_form"]["grader"] == "exact" and report["free_form"]["method"] == "mean"
    assert len(report["points"]) > 3  # the refinement round is scored too
    for p in report["points"]:
        ff = p["free_form"]
        assert ff["n"] == 12 and isinstance(ff["n"], int) and 1 <= ff["mean_tokens"] <= 4
        assert {"accuracy", "ece", "brier", "nll", "auroc", "mean_confidence"} <= set(ff)
        assert 0 <= ff["ece"] <= 1 and ff["nll"] > 0
    assert set(report["frontiers"]) == {"multiple-choice", "free-form", "combined"}
    sel = report["selected"]
    assert sel["objective"] == "combined" and sel["rule"] == "knee"
    assert report["pareto_lambdas"] == report["frontiers"]["combined"]
    chosen = next(p for p in report["points"] if p["lambda"] == sel["lambda"])
    assert sel["objective_metrics"]["accuracy"] == pytest.approx(
        (chosen["accuracy"] + chosen["free_form"]["accuracy"]) / 2)
    assert sel["objective_metrics"]["ece"] == pytest.approx(
        (chosen["ece"] + chosen["free_form"]["ece"]) / 2)
    assert sel["reason"].startswith("Objective: combined")
    assert set(report["heldout"]["free_form"]) == {"base", "aligned", "selected"}
    html = (merged_short / "report.html").read_text()
    assert "free-form ECE" in html and "objective combined" in html
    assert "Short answers, free-form confidence" in html
    cal = json.loads((merged_short / "model" / "calibration.json").read_text())
    assert cal["merge"]["rule"] == "combined:knee"
    assert cal["metrics"]["select_short_answer"]["n"] == 12
    assert "combined" in (merged_short / "model" / "README.md").read_text()


def test_the_written_model_answers_as_the_sweep_recorded(
    merged_short: Path, tiny_world: dict[str, Path]
) -> None:
    from calibserve.calibration.grading import load_grader
    from calibserve.merge.evaluate import short_answer_split
    from calibserve.merge.freeform import FreeFormEvaluator, stop_token_ids

    lam = json.loads((merged_short / "report.json").read_text())["selected"]["lambda"]
    cached = json.loads(next((merged_short / "sweep").rglob(
        f"select-lambda{lam:+.6f}.json")).read_text())["free_form"]["scores"]
    model = AutoModelForCausalLM.from_pretrained(merged_short / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(merged_short / "model")
    items = short_answer_split(merged_short.parent / "data", "select")
    got = FreeFormEvaluator(tok, items, load_grader("exact"), max_new_tokens=4,
                            stop_ids=stop_token_ids(tok, merged_short / "model")
                            ).score(model.eval())
    assert got.replies == cached["replies"]
    assert got.confidence.tolist() == pytest.approx(cached["confidence"], abs=1e-6)

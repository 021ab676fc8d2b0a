"""`calibserve calibrate --label-free --reference BASE` and `calibserve merge --label-free`: the
option-letter temperature fitted by DACA with no labels (fit/label_free.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from calibserve.calibration import CalibrationDocument, Scorer
from calibserve.cli import app as main_app
from calibserve.merge.cli import app as merge_app

runner = CliRunner()


def _calibrate(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["calibrate", "--model", str(model), "--data", str(data), "--out", str(out), *extra]


def _without_answers(src: Path, dst: Path) -> Path:
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    dst.write_text("".join(json.dumps({"question": r["question"], "choices": r["choices"]})
                           + "\n" for r in rows))
    return dst


def test_a_label_free_fit_reads_no_answer(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    """Questions with no answers are accepted; the same questions with answers (any answers)
    give the same temperature and fit: the answers are never read."""
    unlabelled = _without_answers(tiny_world["data"] / "calibrate.jsonl",
                                  tmp_path / "questions.jsonl")
    out = tmp_path / "free" / "calibration.json"
    ok = runner.invoke(main_app, _calibrate(tiny_world["aligned"], unlabelled, out,
                                            "--label-free", "--reference",
                                            str(tiny_world["base"])))
    assert ok.exit_code == 0, ok.output
    assert "fitted label-free (DACA)" in ok.output and "no escalation thresholds" in ok.output
    doc = CalibrationDocument.load(out)
    answer = doc.method("answer")
    fit = answer.fit
    assert fit is not None and fit.labels == "none" and fit.accuracy is None
    assert fit.n == 24 and fit.n_agree is not None and 0 < fit.n_agree <= 24
    assert fit.agreement == pytest.approx(fit.n_agree / 24)
    assert fit.reference == str(tiny_world["base"])
    assert answer.thresholds == [] and doc.merge is None
    assert not (out.parent / "probes.jsonl").exists()  # no test split beside a file
    # The same questions with their answers, and with every answer changed: the same fit.
    fits = []
    for shift in (0, 1):
        rows = [json.loads(line) for line in
                (tiny_world["data"] / "calibrate.jsonl").read_text().splitlines()]
        labelled = tmp_path / f"labelled-{shift}.jsonl"
        labelled.write_text("".join(json.dumps({**r, "answer": (r["answer"] + shift) % 4})
                                    + "\n" for r in rows))
        path = tmp_path / f"cal-{shift}.json"
        res = runner.invoke(main_app, _calibrate(tiny_world["aligned"], labelled, path,
                                                 "--label-free", "--reference",
                                                 str(tiny_world["base"])))
        assert res.exit_code == 0, res.output
        assert "24 of 24 items carried an answer: ignored" in res.output
        other = CalibrationDocument.load(path)
        fits.append(other)
        assert other.temperature() == doc.temperature()
        assert other.method("answer").fit.ece_calibrated == fit.ece_calibrated  # type: ignore[union-attr]
    assert fits[0].to_dict() == fits[1].to_dict()


def test_label_free_arguments_are_checked_before_anything_is_written(
        tiny_world: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["only one"]}) + "\n")
    out = tmp_path / "x.json"
    base = str(tiny_world["base"])
    args = _calibrate(tiny_world["aligned"], tiny_world["data"], out)
    cases = {
        "--reference": [[*args, "--reference", base],  # a reference needs --label-free
                        [*args, "--label-free"],  # --label-free needs a reference
                        [*args, "--label-free", "--reference", str(tmp_path / "nope")]],
        "--calibrator": [[*args, "--label-free", "--reference", base, "--calibrator", "platt"]],
        "--target-accuracy": [[*args, "--label-free", "--reference", base,
                               "--target-accuracy", "0.8"]],
        "--data": [_calibrate(tiny_world["aligned"], bad, out, "--label-free", "--reference",
                              base),
                   _calibrate(tiny_world["aligned"], tmp_path / "none", out, "--label-free",
                              "--reference", base)],
    }
    for flag, argvs in cases.items():
        for argv in argvs:
            result = runner.invoke(main_app, argv)
            assert result.exit_code == 2, (flag, result.output)
            assert f"Invalid value for '{flag}'" in result.output, result.output
            assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_a_reference_with_other_token_ids_is_refused(
        tiny_world: dict[str, Path], pair_factory: object, tmp_path: Path) -> None:
    """The reference is asked in the model's tokens: its own tokenizer must agree id for id."""
    _, grown = pair_factory(grow=3)  # type: ignore[operator]
    out = tmp_path / "x.json"
    result = runner.invoke(main_app, _calibrate(tiny_world["base"], tiny_world["data"], out,
                                                "--label-free", "--reference", str(grown)))
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--reference': tokenizers differ" in result.output
    assert not out.exists()


def test_merge_label_free_fits_the_chosen_point_against_the_base(
        tiny_world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    argv = ["--base", str(tiny_world["base"]), "--aligned", str(tiny_world["aligned"]),
            "--data", str(tiny_world["data"]), "--out", str(out), "--grid", "0,1",
            "--no-refine", "--quiet", "--evaluator", "transformers"]
    for flag, extra in (("--calibrator", ["--calibrator", "platt"]),
                        ("--target-accuracy", ["--target-accuracy", "0.5"])):
        refused = runner.invoke(merge_app, [*argv, "--label-free", *extra])
        assert refused.exit_code == 2 and f"Invalid value for '{flag}'" in refused.output
        assert not out.exists()
    result = runner.invoke(merge_app, [*argv, "--label-free"])
    assert result.exit_code == 0, result.output
    doc = CalibrationDocument.load(out / "model")
    answer = doc.method("answer")
    assert answer.fit is not None and answer.fit.labels == "none"
    assert answer.fit.reference == str(tiny_world["base"]) and answer.thresholds == []
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["thresholds"] == []
    assert any("label-free fit: no escalation thresholds" in n for n in report["notes"])
    assert any("free-form fit: off (--label-free" in n for n in report["notes"])
    # A labelled merge of the same pair records its labels.
    labelled = runner.invoke(merge_app, [*argv[:7], str(tmp_path / "l"), *argv[8:]])
    assert labelled.exit_code == 0, labelled.output
    fit = CalibrationDocument.load(tmp_path / "l" / "model").method("answer").fit
    assert fit is not None and fit.labels == "gold"


LETTER_REPLY = {"content": [{"token": "B", "logprob": -0.01, "top_logprobs": [
    {"token": "B", "logprob": -0.01}, {"token": "A", "logprob": -5.0},
    {"token": "C", "logprob": -6.0}, {"token": "D", "logprob": -7.0}]}]}


def test_label_free_calibration_of_the_demo_pair(demo_dir: Path, tmp_path: Path) -> None:
    """The demo's aligned model against its base on the calibrate split's questions: a
    temperature above 1 (the aligned model is over-confident), fit.labels none, better held-out
    ECE than raw, and what is served says label-free."""
    out = tmp_path / "calibration.json"
    result = runner.invoke(main_app, _calibrate(demo_dir / "aligned", demo_dir / "data", out,
                                                "--label-free", "--reference",
                                                str(demo_dir / "base")))
    assert result.exit_code == 0, result.output
    doc = CalibrationDocument.load(out)
    fit = doc.method("answer").fit
    assert fit is not None and fit.labels == "none"
    assert doc.temperature() > 1.5
    assert fit.n == 320 and 0.5 < (fit.agreement or 0) < 1.0
    held, raw = doc.metrics["test"], doc.metrics["test_raw"]
    assert held["ece"] < raw["ece"] and held["n"] == 320
    assert (out.parent / "probes.jsonl").is_file()
    served = Scorer.from_document(doc).score_choice(LETTER_REPLY, True)
    assert served.calibrated and served.calibration == "label-free"
    # Tempered (the temperature is applied to the letters' logprobs, the map on top is the
    # identity): far less sure than the 0.99 the same logprobs give at T = 1.
    assert served.score < 0.9 and served.score == served.raw

"""benchmarks/realworld/serve_eval and grading without a model: prompts, reply parsing, grading,
the report's metrics and plots on recorded answers, argument errors. Fast (not realworld)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.realworld import serve_eval
from benchmarks.realworld.grading import contains_answer
from benchmarks.realworld.served import done_keys

ITEM = {"question": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1}


def test_user_wording_differs_from_the_calibration_wording() -> None:
    assert serve_eval.calibration_prompt(ITEM, "contract") == "question : 2 + 2 = A 3 B 4 C 5"
    assert serve_eval.calibration_prompt(ITEM) == (
        "question : 2 + 2 = A 3 B 4 C 5\nAnswer with the letter of the correct option.")
    user = serve_eval.user_prompt(ITEM)
    assert user.startswith("2 + 2 =\n\nA. 3\nB. 4\nC. 5\n\n")
    assert user.endswith("(A, B or C).")


@pytest.mark.parametrize(("reply", "want"), [
    ("B", 1), (" B.", 1), ("(C) 5", 2), ("**A**", 0), ("A4", None), ("Because", None),
    ("D", None), ("", None), ("b", None),
])
def test_reply_letter(reply: str, want: int | None) -> None:
    assert serve_eval.reply_letter(reply, 3) == want


@pytest.mark.parametrize(("reply", "gold", "aliases", "want"), [
    ("English.", "English", [], True),
    ("The language of Ivanhoe is English.\nMore text", "English", [], True),
    ("Englishman", "English", [], False),
    ("second line\nEnglish", "English", [], False),
    ("Syriac", "Arabic", ["Syriac"], True),
    ("", "x", [], False),
])
def test_contains_answer(reply: str, gold: str, aliases: list[str], want: bool) -> None:
    assert contains_answer(reply, gold, aliases) is want


def test_done_keys_ignores_a_torn_last_line(tmp_path: Path) -> None:
    f = tmp_path / "r.jsonl"
    f.write_text('{"i": 0, "reply": "A"}\n{"i": 2, "reply": "B"}\n{"i": 3, "re')
    assert done_keys(f) == {0, 2}
    assert done_keys(tmp_path / "missing.jsonl") == set()


def _write_run(out: Path, rng: np.random.Generator, n: int) -> None:
    items: list[dict[str, Any]] = [
        {"question": f"q{i}", "choices": ["a", "b", "c", "d"], "answer": int(i % 4)}
        for i in range(n)]
    serve_eval.write_jsonl(out / "test_mc.jsonl", items)
    rows: list[dict[str, Any]] = []
    for i, it in enumerate(items):
        right = rng.random() < 0.3
        letter = "ABCD"[it["answer"] if right else (it["answer"] + 1) % 4]
        rows.append({"i": i, "reply": letter,
                     "confidence": {"raw": 0.9, "score": 0.3, "method": "answer",
                                    "calibrated": True}})
    for step in ("mc-calibration-wording", "mc-user-wording"):
        serve_eval.write_jsonl(out / f"{step}.jsonl", rows)
    doc = {"multiple_choice": "answer", "free_form": "mean",
           "methods": {"answer": {"fit": {"calibrator": "platt", "n": 10, "accuracy": 0.3,
                                          "ece_raw": 0.6, "ece_calibrated": 0.0}}}}
    (out / "calibration.json").write_text(json.dumps(doc))


def test_report_on_recorded_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALIBSERVE_HOME", str(tmp_path))
    args = serve_eval.parse_args(["--out", str(tmp_path / "run"), "--n-short-calibrate", "0",
                                  "--n-short-test", "0"])
    run = serve_eval.Run(args)
    run.out.mkdir()
    _write_run(run.out, np.random.default_rng(0), 1200)
    serve_eval.report(run)
    results = json.loads((run.out / "results.json").read_text())
    m = results["served"]["mc-user-wording"]
    assert m["n"] == 1200 and abs(m["accuracy"] - 0.3) < 0.05
    assert m["ece_raw"] == pytest.approx(0.9 - m["accuracy"], abs=1e-3)
    assert m["ece_calibrated"] == pytest.approx(abs(0.3 - m["accuracy"]), abs=1e-3)
    assert m["floor_met"] is (m["ece_calibrated"] <= 0.05)
    assert m["served_methods"] == {"answer": 1200}
    assert m["by_method"]["answer"]["n"] == 1200
    assert "short-answer" not in results["served"]
    assert (run.out / "reliability.png").stat().st_size > 10_000
    assert "mc-calibration-wording" in (run.out / "report.md").read_text()


@pytest.mark.parametrize("argv", [
    ["--n-test", "0"], ["--held-out", "calibrate"], ["--held-out", "test,train"],
    ["--n-short-calibrate", "5", "--n-short-test", "0"], ["--task", "nope"],
    ["--short-task", "nope"],
])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        serve_eval.parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_free_form_runs_default_to_world_facts(tmp_path: Path) -> None:
    args = serve_eval.parse_args(["--out", str(tmp_path / "run")])
    assert args.short_task == "world_facts"
    run = serve_eval.Run(args)
    assert run.short_task == "world_facts" and run.params["short_task"] == "world_facts"
    default_name = serve_eval.Run(serve_eval.parse_args([])).out.name
    assert default_name.endswith("-world_facts")
    # qa_wikidata runs keep the parameters and directory name they had before world_facts.
    old = serve_eval.Run(serve_eval.parse_args(["--short-task", "qa_wikidata"]))
    assert "short_task" not in old.params and old.out.name == default_name.removesuffix(
        "-world_facts")
    assert serve_eval.short_split_file("world_facts", "test") == "short_test.jsonl"
    assert serve_eval.short_split_file("qa_wikidata", "test") == "test.jsonl"
    assert serve_eval.short_prompt("world_facts", "What is the capital of Japan?") == (
        "What is the capital of Japan? Answer in a few words.")
    assert serve_eval.short_prompt("qa_wikidata", "The capital of Japan is").startswith(
        "Complete the sentence")


def test_short_answer_report_grades_world_facts_aliases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALIBSERVE_HOME", str(tmp_path))
    run = serve_eval.Run(serve_eval.parse_args(["--out", str(tmp_path / "run")]))
    run.out.mkdir()
    _write_run(run.out, np.random.default_rng(0), 20)
    items = [{"question": "In which country is the city of Leeds? Answer in a few words.",
              "answer": "United Kingdom", "aliases": ["UK", "Great Britain"]},
             {"question": "What is the capital of Ukraine? Answer in a few words.",
              "answer": "Kyiv", "aliases": ["Kiev"]},
             {"question": "In which country is the city of Leeds? Answer in a few words.",
              "answer": "United Kingdom", "aliases": ["UK"]}]
    serve_eval.write_jsonl(run.out / "test_short.jsonl", items)
    replies = ["Leeds is in the UK.", "Kiev", "Ireland"]
    serve_eval.write_jsonl(run.out / "short-answer.jsonl", [
        {"i": i, "reply": r, "confidence": {"raw": 0.5, "score": 0.5, "method": "mean",
                                            "calibrated": False}}
        for i, r in enumerate(replies)])
    serve_eval.report(run)
    m = json.loads((run.out / "results.json").read_text())["served"]["short-answer"]
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(2 / 3, abs=1e-4)

"""benchmarks/realworld/remedy_table, remedy_report and cost without an engine: the metrics,
grading, costs and the report assembled from recorded answers, the row configuration, argument
errors, and the CPU accounting of a process tree (fast, not realworld); and one end-to-end run of
two demo rows on one real engine (vllm, slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.realworld import cost, remedy_report, remedy_table
from benchmarks.realworld.remedy_report import build_cost, cost_text, row_metrics


def test_row_metrics_match_a_hand_computation() -> None:
    # Two items at 0.9 (one right), two at 0.2 (both wrong).
    m = row_metrics([0.9, 0.9, 0.2, 0.2], [0.8, 0.7, 0.5, 0.4], [True, False, False, False],
                    [True, True, False, True], ["mean", "mean", "verify", "mean"])
    assert m["n"] == 4 and m["accuracy"] == 0.25
    assert m["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.2, abs=1e-4)
    assert m["brier"] == pytest.approx((0.01 + 0.81 + 0.04 + 0.04) / 4, abs=1e-4)
    want_ll = -(math.log(0.9) + math.log(0.1) + 2 * math.log(0.8)) / 4
    assert m["log_loss"] == pytest.approx(want_ll, abs=1e-4)
    assert m["auroc"] == pytest.approx(2.5 / 3, abs=1e-4)  # a tie counts one half
    assert m["mean_confidence"] == pytest.approx(0.55, abs=1e-4)
    assert m["calibrated_share"] == 0.75
    assert m["methods"] == {"mean": 3, "verify": 1}
    assert m["auroc_raw"] == pytest.approx(1.0) and m["mean_raw"] == pytest.approx(0.6)


def test_row_metrics_refuse_ragged_input() -> None:
    with pytest.raises(ValueError, match="equally long"):
        row_metrics([0.5], [0.5, 0.4], [True], [True], ["mean"])


def test_grade_uses_contains_with_aliases() -> None:
    items = [{"question": "q0", "answer": "United Kingdom", "aliases": ["UK"]},
             {"question": "q1", "answer": "Kyiv", "aliases": ["Kiev"]},
             {"question": "q2", "answer": "Japan"}]
    conf = {"score": 0.4, "raw": 0.8, "method": "mean", "calibrated": True}
    answers = {0: {"i": 0, "reply": "It is in the UK.", "confidence": conf},
               1: {"i": 1, "reply": "Kiev\nor Kyiv", "confidence": conf},
               2: {"i": 2, "reply": "Japanese", "confidence": conf}}
    score, raw, correct, calibrated, methods = remedy_report.grade(items, answers)
    assert correct == [True, True, False]
    assert score == [0.4] * 3 and raw == [0.8] * 3 and all(calibrated)
    assert methods == ["mean"] * 3


# --- a recorded run ---------------------------------------------------------------------------


def _model(path: Path, template: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"weights")
    cfg = {"chat_template": "{{ messages }}"} if template else {}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def _world(tmp_path: Path, n: int = 40) -> dict[str, Path]:
    rw = tmp_path / "realworld"
    data = rw / "data" / "world_facts"
    data.mkdir(parents=True)
    items = [{"question": f"Where is city {i}?", "answer": "Japan" if i % 2 else "Peru",
              "aliases": ["Nippon"] if i % 2 else []} for i in range(n)]
    (data / "short_test.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    models = rw / "models"
    _model(models / "gemma-3-270m", template=False)
    aligned = _model(models / "gemma-3-270m-instruct")
    (aligned / "train_info.json").write_text(json.dumps({"time": {"cpu_minutes": 40.0}}))
    merged = _model(rw / "gemma-merge" / "model")
    (merged / "calibration.json").write_text('{"free_form": "mean"}')
    (rw / "gemma-merge" / "report.json").write_text(
        json.dumps({"timings": {"load_s": 30, "sweep_s": 540, "write_s": 30}}))
    return {"rw": rw, "data": data, "aligned": aligned, "merged": merged}


def _answers(row_dir: Path, n: int, right: int, score: float, calibrated: bool) -> None:
    """`right` of the first n answers name the gold, the rest a wrong country."""
    row_dir.mkdir(parents=True)
    lines = []
    for i in range(n):
        gold = "Japan" if i % 2 else "Peru"
        reply = f"{gold}." if i < right else "Chile"
        lines.append({"i": i, "reply": reply, "confidence": {
            "score": score, "raw": 0.95, "method": "mean", "calibrated": calibrated}})
    (row_dir / "answers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _argv(w: dict[str, Path], out: Path, *more: str) -> list[str]:
    return ["--realworld", str(w["rw"]), "--out", str(out), *more]


def test_report_from_recorded_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = _world(tmp_path)
    out = tmp_path / "table"
    _answers(out / "rows" / "aligned", 40, right=30, score=0.95, calibrated=False)
    _answers(out / "rows" / "merge-calibrated", 40, right=24, score=0.6, calibrated=True)
    _answers(out / "rows" / "merge", 25, right=20, score=0.9, calibrated=False)  # 25 of 40
    cost.add_session(out / "rows" / "aligned" / "eval-cost.json", "eval",
                     {"wall_s": 60, "cpu_s": 90}, True)
    # The merge was run under the cost wrapper: its CPU record wins over report.json's wall.
    cost.add_session(w["rw"] / "gemma-merge.cost.json", "merge", {"wall_s": 500, "cpu_s": 720},
                     True)
    rc = remedy_table.main(_argv(w, out, "--report-only"))
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert [r["name"] for r in results["rows"]] == list(remedy_table.ROWS)

    a = rows["aligned"]
    assert a["status"] == "measured" and a["calibration"] is None
    assert a["metrics"]["accuracy"] == 0.75 and a["metrics"]["n"] == 40
    assert a["metrics"]["ece"] == pytest.approx(0.2, abs=1e-4)  # 0.95 served, 0.75 right
    assert a["metrics"]["calibrated_share"] == 0.0
    assert a["build_cost"]["cpu_minutes"] == 40.0 and a["eval_cost"]["cpu_minutes"] == 1.5

    mc = rows["merge-calibrated"]
    assert mc["metrics"]["accuracy"] == 0.6 and mc["metrics"]["ece"] == pytest.approx(0, abs=1e-4)
    assert mc["calibration_in_model"] is True
    assert mc["build_cost"]["cpu_minutes"] == pytest.approx(52.0)  # tune 40 + merge 12
    assert [p["kind"] for p in mc["build_cost"]["parts"]] == ["cpu", "cpu"]

    assert rows["merge"]["status"] == "incomplete"  # 25 of the 40 items answered
    assert rows["base"]["status"] == "incomplete"  # built, never asked
    for name in ("cft", "rcft", "sft2", "label-free"):
        assert rows[name]["status"] == "not built"
        assert rows[name]["command"]
    assert "--calibration-aware cft" in rows["cft"]["command"]
    # aligned-calibrated would be fitted here: nothing recorded, so it is not measured yet.
    assert rows["aligned-calibrated"]["status"] == "incomplete"

    assert results["items"]["n_used"] == 40 and results["items"]["n_total"] == 40
    assert set(results["versions"]) >= {"calibserve", "torch", "openai"}
    assert results["machine"]["loadavg_start"] is not None
    md = (out / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| aligned, raw")]
    assert table and "| 40 | 0.750 | 0.200 |" in table[0] and "| no |" in table[0]
    assert "tune gemma-3-270m-instruct 40.0 |" in table[0] and "| 1.5 |" in table[0]
    merge_line = next(line for line in md.splitlines() if line.startswith("| merge + its"))
    assert "tune gemma-3-270m-instruct 40.0 + merge gemma-merge 12.0 = 52.0" in merge_line
    assert "| yes |" in merge_line
    assert "- cft: `calibserve tune" in md and "at least 600" in md
    assert (out / "reliability.png").stat().st_size > 10_000
    assert "| CFT (seed 004) |" in capsys.readouterr().out


def test_merge_cost_falls_back_to_report_timings_as_wall(tmp_path: Path) -> None:
    w = _world(tmp_path)
    spec = remedy_table.default_rows(w["rw"], w["rw"] / "gemma-merge", w["data"])["merge"]
    c = build_cost(spec.cost_files)
    assert [p["kind"] for p in c["parts"]] == ["cpu", "wall"]
    assert c["cpu_minutes"] == 40.0 and c["wall_minutes"] == 10.0 and not c["missing"]
    md_part = cost_text(c)
    assert md_part == "tune gemma-3-270m-instruct 40.0 + merge gemma-merge 10.0 wall = 50.0"
    gone = build_cost([tmp_path / "nope" / "train_info.json"])
    assert gone["missing"] == [str(tmp_path / "nope" / "train_info.json")]
    assert cost_text(gone) == "tune nope ?"
    fitted = remedy_table.RowSpec("f", "f", w["aligned"], tmp_path / "c" / "calibration.json",
                                  fit=w["data"], costs=(w["aligned"] / "train_info.json",))
    assert fitted.cost_files[-1] == tmp_path / "c" / "calibration.cost.json"


def test_answers_of_another_checkpoint_are_set_aside(tmp_path: Path) -> None:
    w = _world(tmp_path, n=10)
    out = tmp_path / "table"
    _answers(out / "rows" / "aligned", 10, right=5, score=0.9, calibrated=False)
    (out / "rows" / "aligned" / "served.json").write_text('{"model": "another"}')
    assert remedy_table.main(_argv(w, out, "--report-only", "--rows", "aligned")) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["status"] == "incomplete"
    assert (out / "rows" / "aligned" / "stale-answers.jsonl").is_file()
    assert not (out / "rows" / "aligned" / "answers.jsonl").exists()


def test_limit_and_rows_select(tmp_path: Path) -> None:
    w = _world(tmp_path)
    out = tmp_path / "table"
    _answers(out / "rows" / "merge", 10, right=10, score=0.9, calibrated=False)
    assert remedy_table.main(_argv(w, out, "--report-only", "--rows", "merge,cft",
                                   "--limit", "10")) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["merge", "cft"]
    assert results["rows"][0]["metrics"]["accuracy"] == 1.0
    assert results["items"]["n_used"] == 10


def test_base_gets_the_builtin_template_only_without_its_own(tmp_path: Path) -> None:
    w = _world(tmp_path)
    args, specs = remedy_table.parse_args(_argv(w, tmp_path / "t"))
    run = remedy_table.Run(args, specs)
    path = remedy_table._template_file(run, specs["base"])
    from calibserve.tune.templates import GEMMA_CHAT_TEMPLATE

    assert path is not None and path.read_text() == GEMMA_CHAT_TEMPLATE
    assert remedy_table._template_file(run, specs["aligned"]) is None  # it has its own


def test_a_model_without_any_template_fails_its_row_only(tmp_path: Path) -> None:
    w = _world(tmp_path, n=4)
    cfg = tmp_path / "rows.yaml"
    cfg.write_text("base: {chat_template: null}\n")
    out = tmp_path / "t"
    argv = _argv(w, out, "--config", str(cfg), "--report-only", "--rows", "base,cft")
    assert remedy_table.main(argv) == 1
    base, cft = json.loads((out / "results.json").read_text())["rows"]
    assert base["status"] == "failed" and "no chat template" in base["error"]
    assert cft["status"] == "not built"


def test_a_completion_row_needs_no_chat_template(tmp_path: Path) -> None:
    # The base checkpoint has none; asked by /v1/completions it is not refused (only unasked).
    w = _world(tmp_path, n=4)
    out = tmp_path / "t"
    assert remedy_table.main(_argv(w, out, "--report-only", "--rows", "base-completion")) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["status"] == "incomplete" and "error" not in row


def test_config_overrides_rows(tmp_path: Path) -> None:
    w = _world(tmp_path)
    cfg = tmp_path / "rows.yaml"
    cfg.write_text("aligned: {model: other, costs: []}\n"
                   "merge-calibrated: {calibration: null}\n"
                   "extra: {model: /m, label: Extra}\n")
    specs = remedy_table.load_config(
        cfg, remedy_table.default_rows(w["rw"], w["rw"] / "gemma-merge", w["data"]))
    assert specs["aligned"].model == tmp_path / "other" and specs["aligned"].costs == ()
    assert specs["merge-calibrated"].calibration is None
    assert specs["extra"].model == Path("/m") and specs["extra"].label == "Extra"
    assert list(specs)[-1] == "extra"


@pytest.mark.parametrize(("text", "why"), [
    ("aligned: {modle: x}", "unknown keys"),
    ("newrow: {label: x}", "needs a model"),
    ("aligned: {calibration: null, fit: /d}", "fit needs a calibration"),
    ("aligned: {costs: x}", "list of paths"),
    ("base: {completion: 'Q: A:'}", "{question}"),
    ("- a\n- b", "top level"),
])
def test_bad_config_exits_2_naming_it(tmp_path: Path, text: str, why: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    w = _world(tmp_path, n=2)
    cfg = tmp_path / "rows.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as exc:
        remedy_table.main(_argv(w, tmp_path / "t", "--config", str(cfg)))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--config" in err and why in err and "Traceback" not in err


@pytest.mark.parametrize(("more", "arg"), [
    (["--rows", "base,nope"], "--rows"), (["--limit", "0"], "--limit"),
    (["--data", "/nonexistent"], "--data"), (["--max-tokens", "0"], "--max-tokens"),
])
def test_bad_arguments_exit_2(tmp_path: Path, more: list[str], arg: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    w = _world(tmp_path, n=2)
    with pytest.raises(SystemExit) as exc:
        remedy_table.main(_argv(w, tmp_path / "t", *more))
    assert exc.value.code == 2
    assert f"argument {arg}" in capsys.readouterr().err


def test_other_settings_in_the_same_out_exit_2(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    w = _world(tmp_path, n=4)
    out = tmp_path / "t"
    assert remedy_table.main(_argv(w, out, "--report-only", "--rows", "cft")) == 0
    assert remedy_table.main(_argv(w, out, "--report-only", "--rows", "cft",
                                   "--max-tokens", "8")) == 2
    assert "argument --out" in capsys.readouterr().err


# --- cost -------------------------------------------------------------------------------------


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_cost_counts_an_orphaned_grandchild(tmp_path: Path) -> None:
    """The child starts a grandchild that burns CPU and exits without waiting for it: the
    grandchild is reparented to the wrapper (a subreaper) and its CPU still counted."""
    child = (f"import subprocess, sys\n"
             f"subprocess.Popen([sys.executable, '-c', {BURN.format(s=0.6)!r}])\n")
    record = tmp_path / "step.cost.json"
    rc = subprocess.call([sys.executable, "-m", "benchmarks.realworld.cost", "--record",
                          str(record), "--step", "demo", "--", sys.executable, "-c", child])
    assert rc == 0
    doc = json.loads(record.read_text())
    assert doc["step"] == "demo" and doc["complete"] is True
    assert doc["cpu_s"] >= 0.6 and doc["sessions"][0]["left_running"] == 0


def test_cost_sessions_add_up_and_failures_are_incomplete(tmp_path: Path) -> None:
    record = tmp_path / "r.json"
    rc = subprocess.call([sys.executable, "-m", "benchmarks.realworld.cost", "--record",
                          str(record), "--step", "s", "--", sys.executable, "-c",
                          BURN.format(s=0.2) + "raise SystemExit(3)"])
    assert rc == 3
    doc: dict[str, Any] = json.loads(record.read_text())
    assert doc["complete"] is False and doc["sessions"][0]["rc"] == 3
    first = doc["cpu_s"]
    assert first >= 0.2
    assert subprocess.call([sys.executable, "-m", "benchmarks.realworld.cost", "--record",
                            str(record), "--step", "s", "--", sys.executable, "-c",
                            BURN.format(s=0.2)]) == 0
    doc = json.loads(record.read_text())
    assert doc["complete"] is True and len(doc["sessions"]) == 2
    assert doc["cpu_s"] == pytest.approx(sum(s["cpu_s"] for s in doc["sessions"]), abs=0.02)
    assert doc["cpu_s"] >= first + 0.2


def test_cost_usage_errors_exit_2(tmp_path: Path) -> None:
    assert cost.main(["--record", str(tmp_path / "r.json"), "--step", "s"]) == 2
    with pytest.raises(SystemExit) as exc:
        cost.main(["--record", str(tmp_path / "r.json"), "--step", "s", "--"])
    assert exc.value.code == 2


# --- end to end on the demo models (one engine: the aligned model's rows) ---------------------


@pytest.mark.vllm
@pytest.mark.slow
def test_demo_rows_served_end_to_end(demo_dir: Path, tmp_path: Path) -> None:
    """The aligned demo model raw and with a calibrator fitted here, both on one engine behind
    one `calibserve serve`, asked through the openai SDK; a rerun starts nothing."""
    pytest.importorskip("vllm")
    demo_dir = demo_dir.resolve()  # the config resolves relative paths against its own folder
    fit_data = tmp_path / "fit-src"
    fit_data.mkdir()
    (fit_data / "calibrate.jsonl").write_text((demo_dir / "data" / "calibrate.jsonl").read_text())
    short = (demo_dir / "data" / "short_calibrate.jsonl").read_text().splitlines()
    (fit_data / "short_calibrate.jsonl").write_text("\n".join(short[:80]) + "\n")
    cal = tmp_path / "fit" / "calibration.json"
    cfg = tmp_path / "rows.yaml"
    cfg.write_text(json.dumps({
        "aligned": {"model": str(demo_dir / "aligned"), "costs": []},
        "aligned-calibrated": {"model": str(demo_dir / "aligned"), "calibration": str(cal),
                               "fit": str(fit_data), "costs": []},
        "as-completion": {"model": str(demo_dir / "aligned"), "costs": [],
                          "completion": "Question: {question}\nAnswer:"}}))
    out = tmp_path / "table"
    argv = ["--config", str(cfg), "--data", str(demo_dir / "data"), "--rows",
            "aligned,aligned-calibrated,as-completion", "--limit", "12", "--out", str(out)]
    assert remedy_table.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    raw, fitted, completion = results["rows"]
    # Asked through /v1/completions on the same engine: every item answered, each with the
    # served confidence, one line each (the prompt stops at the first newline).
    assert completion["status"] == "measured" and completion["metrics"]["n"] == 12
    served = [json.loads(x) for x in
              (out / "rows" / "as-completion" / "answers.jsonl").read_text().splitlines()]
    assert all("\n" not in a["reply"] and 0 <= a["confidence"]["score"] <= 1 for a in served)
    assert raw["status"] == fitted["status"] == "measured"
    assert raw["metrics"]["n"] == fitted["metrics"]["n"] == 12
    assert raw["metrics"]["calibrated_share"] == 0.0  # no calibration.json served
    assert raw["metrics"]["ece"] == raw["metrics"]["ece_raw"]
    assert fitted["metrics"]["calibrated_share"] == 1.0
    # Same engine, same greedy replies: the two rows differ only by the map.
    assert raw["metrics"]["accuracy"] == fitted["metrics"]["accuracy"]
    assert fitted["metrics"]["ece_raw"] == pytest.approx(raw["metrics"]["ece_raw"], abs=1e-3)
    record = cost.read_record(cal.with_suffix(".cost.json"))
    assert record is not None and record["complete"] and record["cpu_s"] > 0
    assert [p["step"] for p in fitted["build_cost"]["parts"]] == ["calibrate"]
    assert raw["eval_cost"]["cpu_s"] > 0  # minutes round to 0.00 on a fast machine
    starts = results["engine_starts"]
    assert len(starts) == 1
    assert starts[0]["rows"] == ["aligned", "aligned-calibrated", "as-completion"]
    answers = (out / "rows" / "aligned" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 12
    assert remedy_table.main(argv) == 0  # everything recorded: no engine, same table
    again = json.loads((out / "results.json").read_text())
    assert len(again["engine_starts"]) == 1
    assert again["rows"][1]["metrics"] == fitted["metrics"]

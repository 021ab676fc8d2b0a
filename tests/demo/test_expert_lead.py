"""The demo's expert is worth escalating to: clearly ahead of the merged model on `test`, because
it read about the long-tail entities the others never saw, and the merged model's confidence
finds those items (issue 29, item 4).

Measured (demo/README.md, "The long tail"): seed 0 (the default build) a lead of 0.175 and a
routing gain of 0.046 at 20%; seed 1 only 0.066 and 0.018; version 7's world 0.022 and 0.005. A
build on another CPU gives other models, as another seed does, so the thresholds sit below the
seed-1 numbers and above version 7's; issue 29's floors (0.08 and 0.03) are benchmark figures
(benchmarks/escalation), met by seed 0 and not by seed 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibserve.demo.evaluate import option_probs

# The expert's lead over the merged model on the whole test split.
MIN_EXPERT_LEAD = 0.05
# At 20% escalation, the least confident 20% beat a random 20% by at least this.
MIN_ROUTE_GAIN = 0.01


@pytest.fixture(scope="module")
def report(demo_dir: Path) -> dict:
    return json.loads((demo_dir / "world.json").read_text())


def _test_items(demo_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (demo_dir / "data" / "test.jsonl").open()]


def _probs(model_dir: Path, items: list[dict]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return option_probs(model.eval(), tok, items)


def test_only_the_expert_knows_the_long_tail(report: dict) -> None:
    by = report["metrics_by_reading"]
    tail_entities = set(report["world"]["long_tail_entities"])
    assert tail_entities and not tail_entities & set(report["world"]["qa_entities"])
    for name in ("base", "aligned"):
        # Near chance (0.25) on entities their pretraining never mentioned...
        assert by[name]["long_tail"]["accuracy"] < 0.45
        # ...and far behind the expert there: much further than on what they did read.
        tail_lead = by["expert"]["long_tail"]["accuracy"] - by[name]["long_tail"]["accuracy"]
        read_lead = (by["expert"]["read_by_base"]["accuracy"]
                     - by[name]["read_by_base"]["accuracy"])
        # (seed 0: leads of 0.61 and 0.51 on the long tail, 0.20 and 0.09 elsewhere; seed 1:
        # 0.31 and 0.28 against 0.13 and 0.04; 80 long-tail items, a standard error of 0.05)
        assert tail_lead > 0.2 and tail_lead > read_lead + 0.1
    # The base knows it does not know: its confidence is lower where it has not read.
    base = by["base"]
    assert base["long_tail"]["mean_confidence"] < base["read_by_base"]["mean_confidence"]


@pytest.mark.slow
def test_expert_leads_the_merge_and_escalation_pays(
    demo_dir: Path, merged_dir: Path, report: dict
) -> None:
    items = _test_items(demo_dir)
    gold = np.array([it["answer"] for it in items])
    merged = _probs(merged_dir / "model", items)
    expert = _probs(demo_dir / "expert", items)
    merged_ok, expert_ok = merged.argmax(1) == gold, expert.argmax(1) == gold
    # The reloaded expert gives what the build measured.
    assert float(expert_ok.mean()) == pytest.approx(report["metrics"]["expert"]["accuracy"])
    lead = float(expert_ok.mean() - merged_ok.mean())
    assert lead >= MIN_EXPERT_LEAD, f"expert only {lead:+.3f} ahead of the merged model"

    # Escalate the 20% the merged model is least sure of (its temperature calibrator is
    # monotone, so the raw confidence ranks the items the same way), against a random 20%.
    k = round(0.2 * len(items))
    low = np.argsort(merged.max(1), kind="stable")[:k]
    routed = merged_ok.copy()
    routed[low] = expert_ok[low]
    random_route = 0.8 * merged_ok.mean() + 0.2 * expert_ok.mean()  # its exact expectation
    gain = float(routed.mean() - random_route)
    assert gain >= MIN_ROUTE_GAIN, f"confidence routing only {gain:+.3f} over random at 20%"

"""MC scoring: the prompt contract, and confidences equal to a by-hand softmax over letters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibserve.calibration import answer_confidence
from calibserve.merge.errors import InvalidData
from calibserve.merge.evaluate import MCEvaluator, format_mc_prompt, load_items, option_token_map


def test_format_mc_prompt_is_the_documented_string() -> None:
    item = {
        "question": "what is the color of zorp ?",
        "choices": ["red", "blue", "green", "gold"],
        "answer": 1,
    }
    assert format_mc_prompt(item) == (
        "question : what is the color of zorp ? A red B blue C green D gold"
    )
    assert format_mc_prompt({"question": "q ?", "choices": ["x", "y"]}) == "question : q ? A x B y"


def test_format_mc_prompt_agrees_with_the_demo() -> None:
    chat = pytest.importorskip("calibserve.demo.chat")
    item = {"question": "what is the home of ka ?", "choices": ["a b", "c", "d", "e"], "answer": 0}
    assert format_mc_prompt(item) == chat.format_mc_prompt(item)


def test_an_item_may_carry_its_own_wording() -> None:
    item = {"question": "q ?", "choices": ["a", "b"], "answer": 1}
    assert format_mc_prompt(item) == "question : q ? A a B b"
    own = {**item, "prompt": "q?\nA. a\nB. b\nAnswer with the letter of the correct option."}
    assert format_mc_prompt(own) == own["prompt"]


def test_load_items_validates_and_skips_short_answers(tmp_path: Path) -> None:
    p = tmp_path / "s.jsonl"
    p.write_text(
        json.dumps({"question": "q ?", "choices": ["a", "b"], "answer": 1})
        + "\n\n"
        + json.dumps({"question": "q2 ?", "answer": "x"})
        + "\n"
    )
    items, skipped = load_items(p)
    assert len(items) == 1 and skipped == 1
    for bad in (
        {"question": "q", "choices": ["a", "b"], "answer": 2},
        {"question": "q", "choices": ["a"], "answer": 0},
        {"question": "q", "choices": ["a", "b"], "answer": True},
        {"choices": ["a", "b"], "answer": 0},
        {"question": "q", "choices": ["a", "b"], "answer": 0, "prompt": ["not", "a", "string"]},
    ):
        p.write_text(json.dumps(bad) + "\n")
        with pytest.raises(InvalidData) as err:
            load_items(p)
        assert "line 1" in err.value.message and err.value.param == "--data"
    p.write_text("{not json\n")
    with pytest.raises(InvalidData, match="not JSON"):
        load_items(p)


def test_option_tokens_include_space_marked_variants() -> None:
    class FakeTok:
        def get_vocab(self) -> dict[str, int]:
            return {"A": 5, "\u0120A": 9, "\u2581B": 3, "Apple": 4, "C": 7, "D": 8}

    found = option_token_map(FakeTok(), ("A", "B", "C", "D"))
    assert found == {"A": [5, 9], "B": [3], "C": [7], "D": [8]}


def test_scores_equal_a_by_hand_softmax_over_letter_logits(tiny_world: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_world["aligned"])
    model = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"], dtype=torch.float32).eval()
    items, _ = load_items(tiny_world["data"] / "select.jsonl")
    # Batched with padding (batch 5) against one unpadded prompt at a time.
    scores = MCEvaluator(tok, items, batch_size=5).score(model)
    letters = [tok.convert_tokens_to_ids(x) for x in "ABCD"]
    for i, item in enumerate(items[:6]):
        text = tok.apply_chat_template(
            [{"role": "user", "content": format_mc_prompt(item)}],
            add_generation_prompt=True,
            tokenize=False,
        )
        assert text.endswith("<|assistant|> answer :")
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0, -1, letters].double()
        probs = torch.softmax(logits, -1).numpy()
        assert scores.prediction[i] == int(np.argmax(probs))
        assert scores.confidence[i] == pytest.approx(float(probs.max()), abs=1e-5)
        assert bool(scores.correct[i]) == (int(np.argmax(probs)) == item["answer"])
        # And it is calibration's own function applied to full-vocabulary logprobs.
        with torch.no_grad():
            full = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
        top = {x: float(full[t]) for x, t in zip("ABCD", letters, strict=True)}
        assert scores.confidence[i] == pytest.approx(answer_confidence(top, None), abs=1e-5)


def test_expected_accuracy_when_items_carry_the_true_distribution(
    tiny_world: dict[str, Path],
) -> None:
    from calibserve.merge.evaluate import point_metrics

    tok = AutoTokenizer.from_pretrained(tiny_world["aligned"])
    model = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"], dtype=torch.float32).eval()
    items, _ = load_items(tiny_world["data"] / "select.jsonl")
    plain = MCEvaluator(tok, items).score(model)
    assert plain.expected is None and "expected_accuracy" not in point_metrics(plain)
    rich = [{**it, "p_true": [0.1, 0.2, 0.3, 0.4]} for it in items]
    scores = MCEvaluator(tok, rich).score(model)
    want = np.asarray([0.1, 0.2, 0.3, 0.4])[scores.prediction]
    assert np.allclose(scores.expected, want)
    m = point_metrics(scores)
    assert m["expected_accuracy"] == pytest.approx(float(want.mean()))

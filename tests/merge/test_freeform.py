"""Short answers at a sweep point: generated as served (greedy, chat template, stop tokens),
scored by the served free-form method, graded by the merge's grader."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibserve.calibration import auroc, brier, confidence_score, ece, nll
from calibserve.calibration.grading import load_grader
from calibserve.merge.freeform import (
    FreeFormEvaluator,
    FreeFormScores,
    free_form_metrics,
    stop_token_ids,
)
from tests.merge.conftest import COLORS, ENTITIES


def _items(n: int) -> list[dict[str, Any]]:
    return [{"question": f"what is the color of {ENTITIES[i % len(ENTITIES)]} ?",
             "answer": COLORS[i % len(COLORS)]} for i in range(n)]


@pytest.fixture(scope="module")
def aligned(tiny_world: dict[str, Path]) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"], dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_world["aligned"])


def _one_by_one(model: Any, tok: Any, question: str, stops: list[int], max_new: int
                ) -> tuple[list[int], list[float]]:
    """The reference: one prompt, no padding, a plain greedy loop over full forward passes (no
    KV cache, no generate()), stopping at a stop token (kept) or after `max_new` tokens."""
    text = tok.apply_chat_template([{"role": "user", "content": question}],
                                   add_generation_prompt=True, tokenize=False)
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    out: list[int] = []
    lps: list[float] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids + out])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)
            t = int(lp.argmax())
            out.append(t)
            lps.append(float(lp[t]))
            if t in stops:
                break
    return out, lps


def test_batched_generation_equals_a_plain_loop_one_prompt_at_a_time(
    aligned: tuple[Any, Any]
) -> None:
    model, tok = aligned
    items = _items(7)
    stops = [tok.eos_token_id]
    # Batches of 3 with prompts of different lengths: left padding has to be invisible.
    ev = FreeFormEvaluator(tok, items, load_grader("exact"), stop_ids=stops, batch_size=3,
                           max_new_tokens=6)
    tokens, logprobs = ev.generate(model)
    for item, got, lp in zip(items, tokens, logprobs, strict=True):
        want, want_lp = _one_by_one(model, tok, item["question"], stops, 6)
        assert got == want
        assert lp == pytest.approx(want_lp, abs=1e-4)
    scores = ev.score(model)
    for i, lp in enumerate(logprobs):
        # The served free-form confidence of those logprobs, through calibration's function.
        assert scores.confidence[i] == pytest.approx(confidence_score(lp, "mean"), abs=1e-12)
        assert scores.n_tokens[i] == len(tokens[i])
        assert scores.replies[i] == tok.decode(tokens[i], skip_special_tokens=True)


def test_a_reply_ends_at_its_first_stop_token_which_is_scored_but_not_graded(
    aligned: tuple[Any, Any]
) -> None:
    model, tok = aligned
    items = _items(4)
    free = FreeFormEvaluator(tok, items, load_grader("exact"), stop_ids=[], max_new_tokens=6)
    tokens, logprobs = free.generate(model)
    # Make the third token of the first reply a stop token (as <end_of_turn> is for Gemma).
    stop = tokens[0][2]
    cut = tokens[0].index(stop) + 1
    ev = FreeFormEvaluator(tok, items, load_grader("exact"), stop_ids=[stop], max_new_tokens=6)
    got, got_lp = ev.generate(model)
    assert got[0] == tokens[0][:cut] and got[0][-1] == stop
    assert got_lp[0] == pytest.approx(logprobs[0][:cut], abs=1e-6)
    for full, short in zip(tokens, got, strict=True):
        assert len(short) <= len(full) and all(t != stop for t in short[:-1])
    scores = ev.score(model)
    # The stop token counts in the confidence (vLLM returns its logprob) but not in the text.
    assert scores.confidence[0] == pytest.approx(math.exp(float(np.mean(got_lp[0]))))
    assert scores.replies[0] == tok.decode(tokens[0][: cut - 1], skip_special_tokens=True)


def test_grades_and_metrics(aligned: tuple[Any, Any]) -> None:
    model, tok = aligned
    items = _items(8)
    probe = FreeFormEvaluator(tok, items, load_grader("exact"), stop_ids=[tok.eos_token_id],
                              max_new_tokens=3)
    replies = probe.score(model).replies
    # Half the golds are what the model says (right under exact), the others words it cannot
    # say (not in the vocabulary); one gold is only an alias away.
    for i in range(8):
        items[i]["answer"] = replies[i] if i % 2 == 0 else "never said"
    items[2] = {**items[2], "answer": "never said", "aliases": ["nor this", replies[2]]}
    scores = FreeFormEvaluator(tok, items, load_grader("exact"), stop_ids=[tok.eos_token_id],
                               max_new_tokens=3).score(model)
    assert scores.correct.tolist() == [i % 2 == 0 for i in range(8)]
    m = free_form_metrics(scores)
    c, y = scores.confidence, scores.correct
    assert m["accuracy"] == 0.5 and m["n"] == 8
    assert m["ece"] == pytest.approx(ece(c, y)) and m["brier"] == pytest.approx(brier(c, y))
    assert m["nll"] == pytest.approx(nll(c, y)) and m["auroc"] == pytest.approx(auroc(c, y))
    assert m["mean_tokens"] == pytest.approx(float(np.mean(scores.n_tokens)))
    again = FreeFormScores.from_dict(json.loads(json.dumps(scores.to_dict())))
    assert again.replies == scores.replies and np.array_equal(again.confidence, c)
    assert np.array_equal(again.correct, y) and np.array_equal(again.n_tokens, scores.n_tokens)


def test_stop_tokens_are_the_tokenizer_eos_and_the_generation_config_list(
    aligned: tuple[Any, Any], tmp_path: Path
) -> None:
    _, tok = aligned
    assert stop_token_ids(tok, tmp_path) == [tok.eos_token_id]
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [tok.eos_token_id, 4, 7]}))
    assert stop_token_ids(tok, tmp_path) == [tok.eos_token_id, 4, 7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert stop_token_ids(tok, tmp_path) == [tok.eos_token_id, 9]


def test_the_logits_kept_for_the_logprobs_cap_the_batch(aligned: tuple[Any, Any]) -> None:
    import calibserve.merge.freeform as ff

    _, tok = aligned
    ev = FreeFormEvaluator(tok, _items(4), load_grader("exact"), stop_ids=[2], batch_size=64,
                           max_new_tokens=16)
    assert ev.batch_size == 64  # a small vocabulary fits
    per_row = len(tok) * 16 * 4
    old = ff.LOGITS_BUDGET
    try:
        ff.LOGITS_BUDGET = 5 * per_row
        assert FreeFormEvaluator(tok, _items(4), load_grader("exact"), stop_ids=[2],
                                 batch_size=64, max_new_tokens=16).batch_size == 5
    finally:
        ff.LOGITS_BUDGET = old

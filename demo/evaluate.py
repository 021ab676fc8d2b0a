"""Scoring the demo models on multiple-choice items in the chat format, and their calibration.

Confidence = softmax over the option letters' next-token logits after the chat prompt, exactly the
rule docs/internals.md fixes for merge/ and server/. The ECE here is a few lines of numpy on
purpose: demo/ imports nothing else of calibserve's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from calibserve.demo.chat import LETTERS, format_mc_prompt

N_BINS = 15


def _last_logits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, contents: Sequence[str]
) -> torch.Tensor:
    """Next-token logits after the chat prompt of each user message (one batch)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False
        )
        for c in contents
    ]
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for r, e in enumerate(encoded):
        ids[r, : len(e)] = torch.tensor(e)
        mask[r, : len(e)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    last: torch.Tensor = logits[torch.arange(len(encoded)), mask.sum(1) - 1]
    return last


def option_probs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Mapping[str, Any]],
    batch_size: int = 128,
) -> np.ndarray:
    """(n_items, n_choices) probabilities over the option letters after the chat prompt."""
    n_choices = len(items[0]["choices"])
    letter_ids = tokenizer.convert_tokens_to_ids(list(LETTERS[:n_choices]))
    out: list[np.ndarray] = []
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        last = _last_logits(model, tokenizer, [format_mc_prompt(item) for item in chunk])
        out.append(torch.softmax(last[:, letter_ids].double(), dim=-1).numpy())
    return np.concatenate(out)


def short_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Mapping[str, Any]],
    batch_size: int = 128,
) -> dict[str, float]:
    """Open questions as plain user messages: the greedy first reply token against the sampled
    gold value (every value is one word), its probability as the confidence, and how often the
    reply starts with a value of the asked attribute at all (not a letter, not `the`)."""
    model.eval()
    hits: list[float] = []
    conf: list[float] = []
    on_topic: list[float] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        probs = torch.softmax(
            _last_logits(model, tokenizer, [str(it["question"]) for it in chunk]).double(), -1
        )
        best = probs.argmax(-1).tolist()
        words = tokenizer.convert_ids_to_tokens(best)
        for it, word, tok, row in zip(chunk, words, best, probs, strict=True):
            hits.append(float(word == it["answer"]))
            conf.append(float(row[tok]))
            on_topic.append(float(word in it["probs"]))
    hit, c = np.array(hits), np.array(conf)
    return {
        "accuracy": float(hit.mean()),
        "ece": ece(c, hit),
        "mean_confidence": float(c.mean()),
        "answers_a_value": float(np.mean(on_topic)),
        "n": len(items),
    }


def ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error, equal-width bins [i/n, (i+1)/n) with 1.0 in the last bin."""
    conf = np.asarray(confidence, dtype=float)
    hit = np.asarray(correct, dtype=float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += sel.sum() * abs(hit[sel].mean() - conf[sel].mean())
    return float(total / len(conf))


def mc_metrics(probs: np.ndarray, items: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Accuracy and ECE against the sampled golds, and against each fact's own distribution."""
    pred = probs.argmax(1)
    conf = probs.max(1)
    gold = np.array([item["answer"] for item in items])
    hit = (pred == gold).astype(float)
    # The probability that the chosen value is true: accuracy without the gold-sampling noise.
    expected = np.array([item["p_true"][p] for item, p in zip(items, pred, strict=True)])
    return {
        "accuracy": float(hit.mean()),
        "ece": ece(conf, hit),
        "expected_accuracy": float(expected.mean()),
        "expected_ece": ece(conf, expected),
        "mean_confidence": float(conf.mean()),
        "n": len(items),
    }

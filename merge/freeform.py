"""Evaluate a causal LM on short-answer items the way the server scores a free-form reply.

Each question is one plain user message under the aligned model's chat template (what
`calibserve serve` forwards to vLLM, and what the free-form fit sends through the serving path).
The reply is generated greedily (the fit's temperature 0), at most `max_new_tokens` tokens,
stopping at an end-of-sequence or end-of-turn token (the tokenizer's EOS and every
`eos_token_id` of the aligned model's `generation_config.json`, as vLLM stops). Its confidence
is `calibration.confidence_score(logprobs, "mean")`, the function the server applies to vLLM's
logprobs, over the temperature-1 logprob of every generated token, the stop token included (vLLM
returns its logprob too); its text (the stop token left out, special tokens skipped, as vLLM
detokenizes) is graded by the merge's grader (`calibration.grading`).

Generation is batched with left padding and the KV cache on; the batch is capped so that the
raw logits kept for the logprobs (batch x steps x vocabulary, float32) stay within
`LOGITS_BUDGET` bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from calibserve.calibration import (
    N_BINS,
    accuracy,
    auroc,
    brier,
    confidence_score,
    ece,
    mean_confidence,
    nll,
)
from calibserve.calibration.answers import Grader

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "FREE_FORM_METHOD",
    "LOGITS_BUDGET",
    "FreeFormEvaluator",
    "FreeFormScores",
    "free_form_metrics",
    "stop_token_ids",
]

# What the server serves a free-form reply by when its document says nothing else.
FREE_FORM_METHOD = "mean"
DEFAULT_MAX_NEW_TOKENS = 16
LOGITS_BUDGET = 256 * 2**20


@dataclass(frozen=True, slots=True)
class FreeFormScores:
    """Per-item results of one free-form evaluation: the raw `mean` confidence, the grade, the
    reply text and how many tokens it took (the stop token included)."""

    confidence: NDArray[np.float64]
    correct: NDArray[np.bool_]
    replies: list[str]
    n_tokens: NDArray[np.int64]

    def to_dict(self) -> dict[str, Any]:
        return {
            "confidence": self.confidence.tolist(),
            "correct": self.correct.astype(int).tolist(),
            "replies": list(self.replies),
            "n_tokens": self.n_tokens.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FreeFormScores:
        return cls(
            np.asarray(d["confidence"], np.float64),
            np.asarray(d["correct"], bool),
            [str(r) for r in d["replies"]],
            np.asarray(d["n_tokens"], np.int64),
        )


def free_form_metrics(scores: FreeFormScores, n_bins: int = N_BINS) -> dict[str, float]:
    """Accuracy, ECE, Brier, NLL (log loss), AUROC (right vs wrong, NaN with one class: written
    as null) and mean confidence of the raw free-form confidence, via calibration/."""
    c, y = scores.confidence, scores.correct
    area = auroc(c, y) if c.size else math.nan
    return {
        "accuracy": accuracy(y),
        "ece": ece(c, y, n_bins),
        "brier": brier(c, y),
        "nll": nll(c, y),
        "auroc": area,
        "mean_confidence": mean_confidence(c),
        "mean_tokens": float(np.mean(scores.n_tokens)) if c.size else 0.0,
        "n": int(c.size),
    }


def stop_token_ids(tokenizer: Any, model_dir: Path | None) -> list[int]:
    """The tokens a reply ends at: the tokenizer's EOS and the `eos_token_id`s of the model's
    `generation_config.json` (Gemma's `<end_of_turn>`, Llama 3's `<|eot_id|>`), as vLLM."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    path = None if model_dir is None else Path(model_dir) / "generation_config.json"
    if path is not None and path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (OSError, ValueError):
            eos = None
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in ids:
                ids.append(i)
    return ids


class FreeFormEvaluator:
    """Tokenizes the questions once, then generates, scores and grades for any model state."""

    def __init__(
        self,
        tokenizer: Any,
        items: Sequence[Mapping[str, Any]],
        grader: Grader,
        *,
        stop_ids: Sequence[int],
        batch_size: int = 32,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        device: str | torch.device = "cpu",
    ) -> None:
        self.items = list(items)
        self.tokenizer = tokenizer
        self.grader = grader
        self.stop_ids = [int(i) for i in stop_ids]
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device)
        pad = tokenizer.pad_token_id
        # No stop token at all: every reply runs to max_new_tokens (vLLM does the same).
        self.pad_id = int(pad if pad is not None else (self.stop_ids or [0])[0])
        vocab = max(len(tokenizer), 1)
        fits = LOGITS_BUDGET // (vocab * max_new_tokens * 4)
        self.batch_size = max(1, min(batch_size, fits))
        self.prompts: list[list[int]] = []
        for item in self.items:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": str(item["question"])}],
                add_generation_prompt=True,
                tokenize=False,
            )
            # vLLM's chat endpoint tokenizes the rendered template without adding specials.
            self.prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        self.order = sorted(range(len(self.prompts)), key=lambda i: -len(self.prompts[i]))

    def __len__(self) -> int:
        return len(self.items)

    @torch.inference_mode()
    def generate(
        self, model: Any, on_batch: Callable[[int], None] | None = None
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Greedy replies (token ids, the stop token included when one was reached) and each
        token's temperature-1 logprob, in item order; `on_batch(n)` after each batch of n."""
        from transformers import GenerationConfig

        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.stop_ids or None,
            pad_token_id=self.pad_id,
            repetition_penalty=1.0,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=True,
        )
        tokens: list[list[int]] = [[] for _ in self.prompts]
        logprobs: list[list[float]] = [[] for _ in self.prompts]
        stops = set(self.stop_ids)
        for start in range(0, len(self.order), self.batch_size):
            idx = self.order[start : start + self.batch_size]
            seqs = [self.prompts[i] for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, width - len(s) :] = torch.tensor(s)
                mask[r, width - len(s) :] = 1
            out = model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=config,
            )
            new = out.sequences[:, width:].cpu()
            # Raw logits (before any processor): the distribution vLLM reports logprobs of.
            lps = torch.stack([torch.log_softmax(s.float(), -1) for s in out.logits], 1)
            chosen = lps.gather(-1, new[:, : lps.shape[1], None].to(lps.device))[..., 0]
            chosen = chosen.double().cpu()
            for r, i in enumerate(idx):
                row = new[r].tolist()
                end = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
                tokens[i] = row[:end]
                logprobs[i] = chosen[r, :end].tolist()
            if on_batch is not None:
                on_batch(len(idx))
        return tokens, logprobs

    def score(
        self, model: Any, on_batch: Callable[[int], None] | None = None
    ) -> FreeFormScores:
        """Reply, raw `mean` confidence and grade of every item for the model's weights."""
        tokens, logprobs = self.generate(model, on_batch)
        return self.score_replies(tokens, logprobs)

    def score_replies(
        self, tokens: Sequence[Sequence[int]], logprobs: Sequence[Sequence[float]]
    ) -> FreeFormScores:
        """Scores of generated replies (token ids, the stop token included when reached, and
        each token's temperature-1 logprob, in item order), whichever engine generated them."""
        stops = set(self.stop_ids)
        conf = np.zeros(len(self.items))
        correct = np.zeros(len(self.items), bool)
        replies: list[str] = []
        for i, item in enumerate(self.items):
            value = confidence_score(logprobs[i], FREE_FORM_METHOD)
            conf[i] = value if math.isfinite(value) else 0.0
            body = list(tokens[i][:-1] if tokens[i] and tokens[i][-1] in stops else tokens[i])
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            replies.append(text)
            aliases = [str(a) for a in item.get("aliases", [])]
            correct[i] = bool(self.grader(text, str(item["answer"]), aliases))
        n_tokens = np.asarray([len(t) for t in tokens], np.int64)
        return FreeFormScores(conf, correct, replies, n_tokens)

"""Output diversity on open prompts: sample a few replies per prompt, measure how alike they are.

Alignment tends to collapse replies onto one phrasing; interpolation can bring variety back. Per
prompt, `samples` replies are drawn at temperature 1 (seeded, so a point is reproducible), then
`calibration.distinct_n` (n=1 and 2, higher = more diverse; one-word replies have no bigrams)
and `calibration.pairwise_jaccard` (lower = more diverse) are averaged over prompts.

Who draws the replies is the evaluator's business: `DiversityProbe.measure` samples with
transformers' `generate`, the vLLM evaluator with the engine's sampler (merge/engine.py
`VllmEvaluator.diversity`); both tokenize the prompts here and score the texts with `score`.
The two samplers draw different random numbers, so their values agree in distribution, not
reply for reply.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from calibserve.calibration import distinct_n, pairwise_jaccard
from calibserve.merge.errors import InvalidData

__all__ = ["load_open_prompts", "DiversityProbe", "score"]


def load_open_prompts(path: Path, limit: int = 40) -> list[str]:
    """Prompts from JSONL lines `{"prompt": str}` (or `question`), at most `limit`."""
    if not path.is_file():
        raise InvalidData(f"--diversity needs open prompts, but {path} does not exist", "--data")
    prompts: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidData(f"{path.name} line {lineno}: not JSON", "--data") from exc
        text = row.get("prompt", row.get("question")) if isinstance(row, dict) else row
        if not isinstance(text, str):
            raise InvalidData(f"{path.name} line {lineno}: needs a string 'prompt'", "--data")
        prompts.append(text)
        if len(prompts) >= limit:
            break
    if not prompts:
        raise InvalidData(f"{path} has no prompts", "--data")
    return prompts


class DiversityProbe:
    """Generates replies for fixed prompts and scores their diversity."""

    def __init__(
        self,
        tokenizer: Any,
        prompts: Sequence[str],
        samples: int = 4,
        max_new_tokens: int = 24,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.tokenizer = tokenizer
        self.samples = samples
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.device = torch.device(device)
        self.inputs: list[list[int]] = []
        for p in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            self.inputs.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))

    @torch.inference_mode()
    def measure(self, model: Any) -> dict[str, float]:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        replies: list[list[str]] = []
        for ids in self.inputs:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            x = torch.tensor([ids], device=self.device)
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=self.max_new_tokens,
                num_return_sequences=self.samples,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            replies.append(
                self.tokenizer.batch_decode(out[:, len(ids) :], skip_special_tokens=True))
        return score(replies)


def score(replies: Sequence[Sequence[str]]) -> dict[str, float]:
    """Diversity of sampled replies, one list of replies per prompt, averaged over prompts."""
    if not replies:
        raise ValueError("no prompts to score")
    d1 = [distinct_n(list(texts), 1) for texts in replies]
    d2 = [distinct_n(list(texts), 2) for texts in replies]
    jac = [pairwise_jaccard(list(texts)) for texts in replies]
    return {
        "distinct_1": float(sum(d1) / len(d1)),
        "distinct_2": float(sum(d2) / len(d2)),
        "pairwise_jaccard": float(sum(jac) / len(jac)),
    }

"""Tiny related Llama checkpoints and multiple-choice data for the merge (tests, benchmarks).

Tiny random Llama parents, a word-level chat tokenizer and MC data, built in a few hundred
milliseconds, so unit tests never wait on the demo and the merge crash drill has a pair to merge.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|user|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> answer :{% endif %}"
)
COLORS = ("red", "blue", "green", "gold")
ENTITIES = tuple(f"ent{i}" for i in range(40))
WORDS = (
    "question",
    ":",
    "what",
    "is",
    "the",
    "color",
    "of",
    "?",
    "answer",
    "A",
    "B",
    "C",
    "D",
    "tell",
    "me",
    "about",
    *COLORS,
    *ENTITIES,
)


def make_tokenizer(extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *WORDS, *extra))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def tiny_config(vocab_size: int, tie: bool = False, **kw: Any) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=2,
        intermediate_size=256,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
        **kw,
    )


def save_model(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast | None,
    path: Path,
    dtype: torch.dtype = torch.float32,
) -> Path:
    model = model.to(dtype)  # type: ignore[arg-type]  # transformers' partial annotations
    model.save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)
    return path


def make_pair(
    root: Path,
    *,
    seed: int = 0,
    tie: bool = False,
    grow: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Path, Path]:
    """A random base and an aligned model = base + a perturbation (so they are related)."""
    torch.manual_seed(seed)
    tok_b = make_tokenizer()
    tok_a = make_tokenizer(tuple(f"new{i}" for i in range(grow)))
    base = LlamaForCausalLM(tiny_config(len(tok_b), tie=tie))
    aligned = LlamaForCausalLM(tiny_config(len(tok_a), tie=tie))
    with torch.no_grad():
        sd = base.state_dict()
        for name, p in aligned.named_parameters():
            src = sd[name]
            if p.shape == src.shape:
                p.copy_(src + 0.05 * torch.randn_like(src))
            else:  # grown vocabulary: shared rows perturbed, new rows random
                p[: src.shape[0]].copy_(src + 0.05 * torch.randn_like(src))
    return (
        save_model(base, tok_b, root / "base", dtype),
        save_model(aligned, tok_a, root / "aligned", dtype),
    )


def make_items(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        e = rng.choice(ENTITIES)
        items.append(
            {
                "question": f"what is the color of {e} ?",
                "choices": list(COLORS),
                "answer": rng.randrange(4),
            }
        )
    return items


def write_data(root: Path, n: int = 24) -> Path:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for k, split in enumerate(("select", "calibrate", "test")):
        rows = make_items(n, seed=k)
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "open_prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"tell me about {e}"}) + "\n" for e in ENTITIES[:3])
    )
    return data

"""Tiny random models, a word-level tokenizer with Gemma's turn tokens, and training data for the
tune tests: each built in well under a second, so `calibserve tune` runs end to end in seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
COLORS = ("red", "blue", "green", "gold")
ENTITIES = tuple(f"ent{i}" for i in range(24))
WORDS = ("user", "model", "system", "question", ":", "what", "is", "the", "color", "of", "?",
         "A", "B", "C", "D", "hello", "hi", "answer", "briefly", *COLORS, *ENTITIES)


def make_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *WORDS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", chat_template=chat_template, model_max_length=256,
        padding_side="right", clean_up_tokenization_spaces=False,
    )


def llama(vocab_size: int, tie: bool = True) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, vocab_size=vocab_size, max_position_embeddings=256,
        tie_word_embeddings=tie, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def gemma3(vocab_size: int, softcap: float | None = 30.0) -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
        sliding_window=4, final_logit_softcapping=softcap, bos_token_id=2, eos_token_id=1,
        pad_token_id=0,
    )
    return Gemma3ForCausalLM(config)


def mc_item(rng: random.Random) -> dict[str, Any]:
    return {"question": f"what is the color of {rng.choice(ENTITIES)} ?",
            "choices": list(COLORS), "answer": rng.randrange(len(COLORS))}


def short_item(rng: random.Random) -> dict[str, Any]:
    return {"question": f"what is the color of {rng.choice(ENTITIES)} ?",
            "answer": rng.choice(COLORS), "aliases": []}


def chat_item(rng: random.Random) -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": "answer briefly"},
                         {"role": "user", "content": f"hello what is the color of "
                                                     f"{rng.choice(ENTITIES)} ?"},
                         {"role": "assistant", "content": f"hi {rng.choice(COLORS)}"}]}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tied-embedding Llama with the word-level tokenizer and no chat template (a base
    model: training it needs --chat-template)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    tok = make_tokenizer()
    llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 examples: multiple choice, short answers and chats mixed."""
    rng = random.Random(0)
    rows = [f(rng) for _ in range(14) for f in (mc_item, short_item, chat_item)][:40]
    return write_jsonl(tmp_path_factory.mktemp("tune-data") / "train.jsonl", rows)

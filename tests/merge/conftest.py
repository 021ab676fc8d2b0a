"""Tiny random Llama parents, a word-level chat tokenizer and MC data for the merge tests.

Everything here is built in a few hundred milliseconds, so unit tests never wait on the demo. The
builders are calibserve.testing.checkpoints' (the merge crash drill uses them too).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from calibserve.testing.checkpoints import (
    COLORS,
    ENTITIES,
    WORDS,
    make_pair,
    save_model,
    write_data,
)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One shared tiny pair and data set (read-only: tests that mutate make their own)."""
    root = tmp_path_factory.mktemp("tiny-world")
    base, aligned = make_pair(root)
    return {"root": root, "base": base, "aligned": aligned, "data": write_data(root)}


@pytest.fixture
def pair_factory(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    def build(**kw: Any) -> tuple[Path, Path]:
        return make_pair(tmp_path / f"pair-{len(list(tmp_path.iterdir()))}", **kw)

    return build


def write_raw_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


# --- A tiny random Gemma 3 pair (Gemma3ForCausalLM): the real pair's architecture in seconds.

GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def make_gemma_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    """Word-level, Gemma's special tokens and ids (pad 0, eos 1, bos 2); the aligned one has
    Gemma's chat template (a turn ends with `<end_of_turn>`, not `<eos>`)."""
    vocab = {tok: i for i, tok in enumerate((*GEMMA_SPECIALS, "user", "model", *WORDS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False)
                             for t in GEMMA_SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=GEMMA_TEMPLATE if chat else None,
        model_max_length=256,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def gemma_config(vocab_size: int) -> Any:
    """2 layers, one sliding-window (window 4, shorter than every prompt) and one global, tied
    embeddings, final-logit soft-capping on (Gemma 2's; Gemma 3 270M has it off)."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=[1, GEMMA_SPECIALS.index("<end_of_turn>")],
        bos_token_id=2,
    )


def make_gemma_pair(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A random Gemma3ForCausalLM base and an aligned = base + a perturbation, each saved with
    its tokenizer and a `generation_config.json` whose EOS list holds `<end_of_turn>`."""
    from transformers import Gemma3ForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    paths = []
    base_sd: dict[str, torch.Tensor] | None = None
    for name, chat in (("base", False), ("aligned", True)):
        tok = make_gemma_tokenizer(chat)
        model = Gemma3ForCausalLM(gemma_config(len(tok)))
        if base_sd is not None:
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    p.copy_(base_sd[pname] + 0.01 * torch.randn_like(p))
        base_sd = base_sd or {k: v.clone() for k, v in model.state_dict().items()}
        model.generation_config = GenerationConfig(
            bos_token_id=2, pad_token_id=0, eos_token_id=[1, tok.convert_tokens_to_ids(
                "<end_of_turn>")])
        paths.append(save_model(model, tok, root / name))
    return paths[0], paths[1]


def write_short_answers(data: Path, n: int = 12, seed: int = 7,
                        splits: tuple[str, ...] = ("select", "calibrate", "test")) -> Path:
    """`short_<split>.jsonl` files of short-answer items (a colour, sometimes an alias)."""
    rng = random.Random(seed)
    for split in splits:
        rows = []
        for i in range(n):
            item: dict[str, Any] = {"question": f"what is the color of {rng.choice(ENTITIES)} ?",
                                    "answer": rng.choice(COLORS)}
            if i % 3 == 0:
                item["aliases"] = [rng.choice(COLORS)]
            rows.append(item)
        (data / f"short_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data

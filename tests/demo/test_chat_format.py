"""The demo chat format matches the contract in docs/internals.md, through the real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from calibserve.demo import format_mc_prompt

ITEM = {"question": "what is the color of the zorp ?", "choices": ["red", "blue", "green", "gold"],
        "answer": 1}


def test_format_mc_prompt_matches_contract() -> None:
    assert format_mc_prompt(ITEM) == (
        "question : what is the color of the zorp ? A red B blue C green D gold"
    )
    three = {**ITEM, "choices": ["x", "y", "z"]}
    assert format_mc_prompt(three).endswith("? A x B y C z")


def test_chat_template_renders_contract(tiny_world: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_world / "aligned")
    messages = [{"role": "user", "content": format_mc_prompt(ITEM)}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"<|user|> {format_mc_prompt(ITEM)} <|assistant|> answer :"
    plain = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert plain.strip() == f"<|user|> {format_mc_prompt(ITEM)}"
    assert tok.eos_token == "<|end|>"
    # Letters are whole tokens whose string is the bare letter, and decoding re-inserts spaces.
    for letter in "ABCD":
        (tid,) = tok.encode(letter, add_special_tokens=False)
        assert tok.convert_ids_to_tokens(tid) == letter
        assert tok.decode([tid]) == letter
    ids = tok.encode("the color of the zorp is red .", add_special_tokens=False)
    assert tok.decode(ids) == "the color of the <unk> is red ."  # unknown words stay visible
    end = tok.encode("B <|end|>", add_special_tokens=False)
    assert tok.decode(end, skip_special_tokens=True) == "B"


def test_tokenizer_config_carries_template(tiny_world: Path) -> None:
    for name in ("base", "aligned", "expert"):
        config = json.loads((tiny_world / name / "tokenizer_config.json").read_text())
        assert "<|assistant|> answer :" in config["chat_template"]
        assert config["eos_token"] == "<|end|>"

"""The demo checkpoints served by a real vLLM CPU server: chat template, letters, logprobs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibserve.demo import MODELS, format_mc_prompt
from calibserve.demo.evaluate import option_probs

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _first_item(demo_dir: Path) -> dict:
    return json.loads((demo_dir / "data" / "test.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("name", MODELS)
def test_mc_answer_through_vllm(demo_dir: Path, vllm_server, name: str) -> None:
    url = vllm_server(demo_dir / name, name)
    item = _first_item(demo_dir)
    body = {
        "model": name,
        "messages": [{"role": "user", "content": format_mc_prompt(item)}],
        # 20 (vLLM's maximum): the base answers the chat prompt mostly with "the"/"a", as a base
        # model does, so its letters sit a few places down the list.
        "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 20,
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    choice = reply["choices"][0]
    first = choice["logprobs"]["content"][0]
    top = {t["token"]: t["logprob"] for t in first["top_logprobs"]}
    # vLLM returns the letters as bare tokens "A".."D" (no leading space or marker).
    letters = {k: v for k, v in top.items() if k in {"A", "B", "C", "D"}}
    if name == "aligned":
        assert first["token"] in {"A", "B", "C", "D"}
        assert choice["message"]["content"].strip() == first["token"]
        assert choice["finish_reason"] == "stop"  # <|end|> is EOS and is not shown
        assert len(letters) == 4
    if name != "base":
        assert letters, f"{name}: no option letter in the first token's top logprobs: {top}"
    # The base learned the short-answer chat form (demo world v6): its first token is a value
    # and the letters can sit below vLLM's top 20, so agreement is checked on what vLLM returned.
    # vLLM applied the same chat template as transformers: the probabilities agree.
    model = AutoModelForCausalLM.from_pretrained(demo_dir / name)
    tok = AutoTokenizer.from_pretrained(demo_dir / name)
    probs = option_probs(model, tok, [item])[0]
    vocab = tok.get_vocab()
    shown = [t for t in top if t in vocab]
    assert shown, top
    full = torch_logprobs(model, tok, item, shown)
    for token in shown:
        assert top[token] == pytest.approx(full[token], abs=2e-3)
    if len(letters) == 4:
        mass = sum(math.exp(v) for v in letters.values())
        for i, letter in enumerate("ABCD"):
            assert math.exp(letters[letter]) / mass == pytest.approx(probs[i], abs=2e-3)


def torch_logprobs(model, tok, item: dict, tokens: list[str]) -> dict[str, float]:
    """Full-vocabulary next-token logprobs of `tokens` after the chat prompt (transformers)."""
    import torch

    text = tok.apply_chat_template(
        [{"role": "user", "content": format_mc_prompt(item)}],
        add_generation_prompt=True, tokenize=False,
    )
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
    return {c: float(logp[tok.convert_tokens_to_ids(c)]) for c in tokens}


def test_open_prompt_text_reads_normally(demo_dir: Path, vllm_server) -> None:
    url = vllm_server(demo_dir / "base", "base")
    entity = _first_item(demo_dir)["entity"]
    body = {"model": "base", "prompt": f"the color of the {entity} is", "max_tokens": 6,
            "temperature": 0, "logprobs": 2}
    choice = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    tokens = choice["logprobs"]["tokens"]
    assert choice["text"].startswith(" ")  # words are re-spaced by the decoder
    assert choice["text"].split() == [t for t in tokens if not t.startswith("<|")]

"""Real-tokenizer smoke test: SmolLM2-135M-Instruct (byte-level BPE, ChatML) from the registry.

(a) the converted checkpoint loads in transformers, its chat template renders ChatML, and the
option letters are vocabulary pieces ("A", "ĠA") that `normalize_token` reads as letters;
(b) through `calibserve serve --config` (a managed real vLLM CPU engine, `--enforce-eager`) and the
openai SDK, an MMLU question asked as a chat message gets a first token whose top_logprobs hold
option letters; the served `confidence` is the option-letter method's (the server found the
letter tokens under the ChatML template and byte-level BPE) and agrees with transformers' own
next-token distribution read in raw BPE pieces (a reply starting with a word is `no_letter`);
a free-form reply to a prompt without options gets the free-form method's
confidence (`verify`: the engine's P(yes) over the yes/no token ids), also when the reply ran to
the engine's 256-token context (issue 12: its verify prompt did not fit and fell back to
`mean`), and a request without logprobs still gets a confidence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from openai.types.chat import ChatCompletionMessageParam
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from calibserve.calibration import answer_confidence, normalize_token

pytestmark = [pytest.mark.realworld, pytest.mark.slow]

LETTERS = ("A", "B", "C", "D")
# Prompts must fit the test engine's --max-model-len (256, calibserve.testing.vllm_process)
# with room for the reply; MMLU questions longer than this are skipped when picking test items.
MAX_PROMPT_TOKENS = 200
N_QUESTIONS = 3


def user_prompt(item: dict[str, Any]) -> str:
    """An MMLU item in a user's own words (not the demo's `format_mc_prompt`)."""
    pairs = zip(LETTERS, item["choices"], strict=True)
    options = "\n".join(f"{letter}. {text}" for letter, text in pairs)
    return (f"{item['question']}\n\n{options}\n\n"
            "Reply with the letter of the correct option (A, B, C or D).")


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def sdk_chat(prompt: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def model(smollm2_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def questions(mmlu_dir: Path, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    picked: list[dict[str, Any]] = []
    with (mmlu_dir / "test.jsonl").open() as fh:
        for line in fh:
            item = json.loads(line)
            if len(prompt_ids(tokenizer, user_prompt(item))[0]) <= MAX_PROMPT_TOKENS:
                picked.append(item)
            if len(picked) == N_QUESTIONS:
                return picked
    raise AssertionError("too few short MMLU test items")


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
    """The ids vLLM's chat endpoint feeds the model: the rendered template, no added specials."""
    text = tokenizer.apply_chat_template(chat(prompt), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def hf_first_token_top(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, k: int = 20
) -> dict[str, float]:
    """transformers' next-token top-k at the generation prompt, as raw vocabulary pieces."""
    ids = prompt_ids(tokenizer, prompt)
    with torch.inference_mode():
        logits = model(ids).logits[0, -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logprobs, k)
    pieces = tokenizer.convert_ids_to_tokens(top.indices.tolist())
    return dict(zip(pieces, top.values.tolist(), strict=True))


@pytest.fixture(scope="module")
def hf_tops(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: list[dict[str, Any]]
) -> list[dict[str, float]]:
    return [hf_first_token_top(model, tokenizer, user_prompt(item)) for item in questions]


# --- (a) the checkpoint, its template and its letter tokens ---------------------------------


def test_checkpoint_loads_and_template_renders_chatml(
    smollm2_dir: Path, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
) -> None:
    info = json.loads((smollm2_dir / "info.json").read_text())
    assert info["architecture"] == "LlamaForCausalLM" and info["vocab_size"] == 49152
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    assert tokenizer.chat_template, "the converted tokenizer has no chat template"
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True, tokenize=False,
    )
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids("<|im_end|>")) \
        == "<|im_end|>"


def test_letters_are_byte_level_bpe_pieces(tokenizer: PreTrainedTokenizerBase) -> None:
    unk = tokenizer.unk_token_id
    for letter in LETTERS:
        for piece in (letter, "\u0120" + letter):  # "A" and "ĠA" (space-prefixed)
            assert tokenizer.convert_tokens_to_ids(piece) not in (None, unk), piece
            assert normalize_token(piece) == letter
        assert tokenizer.decode(tokenizer.convert_tokens_to_ids(["\u0120" + letter])) \
            == " " + letter


def test_dequantized_weights_answer_sensibly(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    # Random or mis-mapped weights would not say Paris: the conversion kept the model.
    ids = prompt_ids(tokenizer, "What is the capital of France?")
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)  # type: ignore[operator]
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_option_letters_found_in_raw_bpe_top_logprobs(hf_tops: list[dict[str, float]]) -> None:
    for top in hf_tops:
        letters = {normalize_token(t) for t in top} & set(LETTERS)
        assert len(letters) >= 2, f"option letters among raw top-20 pieces: {sorted(top)}"
        p = answer_confidence(top, None)
        assert 0.25 <= p <= 1.0  # the most likely of 4 options holds at least a quarter


# --- (b) through `calibserve serve` (managed vLLM engine) and the openai SDK ----------------


@pytest.fixture(scope="module")
def client(smollm2_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_url}/v1", api_key="unused")


def served_confidence(choice: Any) -> dict[str, Any]:
    """`choices[i].confidence`, calibserve's field beside the OpenAI ones."""
    conf = (choice.model_extra or {}).get("confidence")
    assert isinstance(conf, dict), f"no confidence on the served choice: {choice}"
    return conf


@pytest.mark.vllm
def test_served_option_letter_confidence_under_chatml_and_bpe(
    client: openai.OpenAI, questions: list[dict[str, Any]], hf_tops: list[dict[str, float]]
) -> None:
    by_answer = 0
    for item, hf_top in zip(questions, hf_tops, strict=True):
        resp = client.chat.completions.create(
            model="smollm2", messages=sdk_chat(user_prompt(item)),
            max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20,
        )
        choice = resp.choices[0]
        assert choice.logprobs is not None and choice.logprobs.content
        first = choice.logprobs.content[0]
        top = {alt.token: alt.logprob for alt in first.top_logprobs}
        letters = {normalize_token(t) for t in top} & set(LETTERS)
        assert len(letters) >= 2, f"option letters among the served top-20: {sorted(top)}"

        conf = served_confidence(choice)
        letter = normalize_token(first.token)
        if letter not in LETTERS:  # a word first, to a prompt listing options: no_letter
            assert conf["method"] == "no_letter" and conf["calibrated"] is False, conf
            continue
        by_answer += 1
        # The server found the letter tokens under the ChatML template in byte-level BPE pieces
        # and scored the reply with the option-letter method (no calibrator: served as raw).
        assert conf["method"] == "answer", f"the option-letter method fell back: {conf}"
        assert conf["calibrated"] is False and conf["score"] == conf["raw"]
        # The served raw is the chosen letter's share of the option mass in what was returned
        # (greedy: the sampled letter is the most likely one).
        assert conf["raw"] == pytest.approx(answer_confidence(top, letter, LETTERS), rel=1e-6)
        assert conf["raw"] == pytest.approx(answer_confidence(top, None, LETTERS), rel=1e-6)
        # Same distribution as transformers reads it in raw "ĠA"-style pieces (float32 both).
        assert conf["raw"] == pytest.approx(answer_confidence(hf_top, None, LETTERS), abs=0.02)
    assert by_answer >= 1, "no reply was served by the option-letter method"


@pytest.mark.vllm
def test_served_free_form_reply_gets_a_verify_confidence(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="smollm2",
        messages=sdk_chat("What is the capital of France? Answer in one sentence."),
        max_tokens=16, temperature=0.0, logprobs=True, top_logprobs=5,
    )
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    assert normalize_token(choice.logprobs.content[0].token) not in LETTERS
    assert "Paris" in (choice.message.content or "")
    conf = served_confidence(choice)
    # The verdict read with SmolLM2's own yes/no ids: neither side is ever missing.
    assert conf["method"] == "verify" and conf["calibrated"] is False, conf
    assert 0.0 < conf["raw"] < 1.0 and conf["score"] == conf["raw"]


@pytest.mark.vllm
@pytest.mark.anyio
async def test_verify_prompt_on_ids_under_chatml_and_bpe(smollm2_url: str) -> None:
    """verify's prompt on token ids (the reply's own ids and the ChatML tail learned from the
    engine) is the token sequence vLLM makes of the text prompt, through calibserve."""
    from calibserve.testing.verify_ids import check_verify_ids

    await check_verify_ids(smollm2_url, "smollm2",
                           "What is the capital of France? Answer in one sentence.",
                           "The capital of France is")


@pytest.mark.vllm
def test_verify_of_a_reply_that_filled_the_context(client: openai.OpenAI) -> None:
    # No max_tokens: the reply runs until the 256-token context is full, so the verify prompt
    # (the conversation, the reply and the question) cannot fit as it is (issue 12).
    resp = client.chat.completions.create(
        model="smollm2", temperature=0.0,
        messages=sdk_chat("Write a long story about a balcony, repeating yourself."),
    )
    choice = resp.choices[0]
    assert resp.usage is not None and resp.usage.total_tokens >= 250, resp.usage
    conf = served_confidence(choice)
    assert conf["method"] == "verify", conf
    assert 0.0 < conf["raw"] < 1.0


@pytest.mark.vllm
def test_served_confidence_without_logprobs_asked(
    client: openai.OpenAI, questions: list[dict[str, Any]]
) -> None:
    # A user who asks for no logprobs still gets the confidence, and no logprobs back.
    resp = client.chat.completions.create(
        model="smollm2", messages=sdk_chat(user_prompt(questions[0])),
        max_tokens=4, temperature=0.0,
    )
    choice = resp.choices[0]
    assert choice.logprobs is None
    conf = served_confidence(choice)
    assert conf["method"] in ("answer", "no_letter") and 0.0 <= conf["score"] <= 1.0

"""`calibserve merge` on a tiny random Gemma 3 pair: the real pair's architecture in seconds.

Gemma 3 specifics the merge meets: tied embeddings (no `lm_head` stored; the written model stays
tied), the embedding scale and soft-capping (computed by the model, not stored), sliding-window
layers beside global ones (a window shorter than every prompt here, with left-padded batches),
`<end_of_turn>` as the end of a reply (the generation config's EOS list, not the tokenizer's
EOS), and the multimodal checkpoints' `language_model.model.*` names, which
`Gemma3ForConditionalGeneration` holds as `model.language_model.*`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from calibserve.merge.cli import app
from tests.merge.conftest import (
    COLORS,
    ENTITIES,
    make_gemma_pair,
    make_gemma_tokenizer,
    save_model,
    write_data,
)

MAX_NEW = 4


def _reference_reply(model: Any, tok: Any, question: str, stops: list[int]
                     ) -> tuple[str, float]:
    """Greedy reply and its mean token probability the slow way: one prompt, full forward
    passes, no cache, no padding, no generate()."""
    text = tok.apply_chat_template([{"role": "user", "content": question}],
                                   add_generation_prompt=True, tokenize=False)
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    out: list[int] = []
    lps: list[float] = []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            lp = torch.log_softmax(model(torch.tensor([ids + out])).logits[0, -1].double(), -1)
            out.append(int(lp.argmax()))
            lps.append(float(lp[out[-1]]))
            if out[-1] in stops:
                break
    body = out[:-1] if out[-1] in stops else out
    return tok.decode(body, skip_special_tokens=True), math.exp(sum(lps) / len(lps))


@pytest.fixture(scope="module")
def gemma_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gemma")
    base, aligned = make_gemma_pair(root)
    data = write_data(root, n=12)
    model = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(aligned)
    stops = [1, tok.convert_tokens_to_ids("<end_of_turn>")]
    items, expected = [], []
    for i in range(12):
        question = f"what is the color of {ENTITIES[i]} ?"
        reply, conf = _reference_reply(model, tok, question, stops)
        # Half the golds are the aligned model's own reply: it is right on exactly those.
        right = i % 2 == 0 and reply.strip() != ""
        items.append({"question": question, "answer": reply if right else "never said",
                      "aliases": [COLORS[i % 4]] if i % 3 == 0 and not right else []})
        expected.append((right or reply == COLORS[i % 4] and i % 3 == 0, conf))
    for split in ("select", "calibrate", "test"):
        (data / f"short_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return {"root": root, "base": base, "aligned": aligned, "data": data, "expected": expected}


@pytest.fixture(scope="module")
def gemma_merged(gemma_world: dict[str, Any]) -> tuple[Path, str]:
    out = gemma_world["root"] / "out"
    result = CliRunner().invoke(app, [
        "--base", str(gemma_world["base"]), "--aligned", str(gemma_world["aligned"]),
        "--data", str(gemma_world["data"]), "--out", str(out), "--grid", "0,0.5,1",
        "--no-refine", "--max-new-tokens", str(MAX_NEW), "--select", "combined:max-accuracy",
        "--calibrator", "temperature", "--evaluator", "transformers",
    ])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_the_report_has_free_form_metrics_at_every_lambda(
    gemma_merged: tuple[Path, str], gemma_world: dict[str, Any]
) -> None:
    out, output = gemma_merged
    # merge's own command has no serving path to fit the free-form maps with: it says so.
    assert "free-form fit: off" in output
    report = json.loads((out / "report.json").read_text())
    assert [p["lambda"] for p in report["points"]] == [0.0, 0.5, 1.0]
    for p in report["points"]:
        ff = p["free_form"]
        assert ff is not None and ff["n"] == 12, p
        for key in ("accuracy", "ece", "brier", "nll", "mean_confidence"):
            assert ff[key] is not None and math.isfinite(ff[key]), (p["lambda"], key)
    # At lambda 1 the sweep's live model is the aligned checkpoint: its numbers are the slow
    # reference's, one prompt at a time.
    aligned = report["points"][-1]["free_form"]
    right = [r for r, _ in gemma_world["expected"]]
    assert aligned["accuracy"] == pytest.approx(sum(right) / len(right))
    assert right.count(True) >= 1 and aligned["auroc"] is not None
    mean_conf = sum(c for _, c in gemma_world["expected"]) / len(right)
    assert aligned["mean_confidence"] == pytest.approx(mean_conf, abs=1e-5)
    assert report["selected"]["objective"] == "combined"
    assert set(report["frontiers"]) == {"multiple-choice", "free-form", "combined"}


def test_the_written_gemma_loads_and_is_the_interpolation(
    gemma_merged: tuple[Path, str], gemma_world: dict[str, Any]
) -> None:
    out, _ = gemma_merged
    lam = json.loads((out / "report.json").read_text())["selected"]["lambda"]
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.tie_word_embeddings
    stored = {k: v for f in sorted((out / "model").glob("*.safetensors"))
              for k, v in load_file(str(f)).items()}
    assert "lm_head.weight" not in stored  # tied, as both parents
    base = load_file(str(gemma_world["base"] / "model.safetensors"))
    aligned = load_file(str(gemma_world["aligned"] / "model.safetensors"))
    assert set(stored) == set(aligned) == set(base)
    params = dict(model.named_parameters())
    for name, tensor in stored.items():
        want = torch.lerp(base[name], aligned[name], lam)
        assert torch.equal(tensor, want), name
        assert torch.equal(params[name].detach(), want), name  # what transformers loaded
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # and it answers the short questions as the sweep recorded at that lambda
    cached = json.loads(next((out / "sweep").rglob(f"select-lambda{lam:+.6f}.json"))
                        .read_text())["free_form"]["scores"]
    tok = AutoTokenizer.from_pretrained(out / "model")
    stops = [1, tok.convert_tokens_to_ids("<end_of_turn>")]
    items = [json.loads(line) for line in (gemma_world["data"] / "short_select.jsonl").open()]
    for item, reply, conf in zip(items, cached["replies"], cached["confidence"], strict=True):
        got, got_conf = _reference_reply(model, tok, item["question"], stops)
        assert got == reply and got_conf == pytest.approx(conf, abs=1e-5)


def test_multimodal_checkpoint_names_reach_the_right_parameters(tmp_path: Path) -> None:
    """Gemma3ForConditionalGeneration stores `language_model.model.*` and `vision_tower.*`; the
    sweep's live model holds `model.language_model.*`: each tensor must set its own parameter."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        SiglipVisionConfig,
    )

    import calibserve.merge.writer as writer
    from calibserve.merge.checkpoint import open_checkpoint, plan_pair
    from calibserve.merge.model import load_eval_model
    from tests.merge.conftest import gemma_config

    tok = make_gemma_tokenizer(chat=True)
    vocab = len(tok)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=gemma_config(vocab + 3).to_dict(),
                       vision_config=vision.to_dict(), mm_tokens_per_image=4,
                       image_token_index=vocab, boi_token_index=vocab + 1,
                       eoi_token_index=vocab + 2)
    torch.manual_seed(0)
    paths = []
    for name in ("base", "aligned"):
        paths.append(save_model(Gemma3ForConditionalGeneration(cfg), tok, tmp_path / name))
    stored = load_file(str(paths[1] / "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in stored)  # the legacy layout
    plan = plan_pair(open_checkpoint(str(paths[0]), "--base"),
                     open_checkpoint(str(paths[1]), "--aligned"))
    em = load_eval_model(plan, "linear", torch.float32, "cpu")
    em.set(0.3)
    writer.write_model(plan, 0.3, "linear", tmp_path / "m", 10**9, "card")
    shutil.copy(paths[1] / "tokenizer.json", tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    live = dict(em.model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, live[name]), name
    ids = torch.tensor([[2, 4, 6, 20, 21, 22, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, em.model(input_ids=ids).logits)


def test_left_padding_is_invisible_to_sliding_window_layers(gemma_world: dict[str, Any]) -> None:
    """Multiple-choice prompts of different lengths batched with left padding score as each does
    alone (the window, 4 tokens, is shorter than every prompt)."""
    from calibserve.merge.evaluate import MCEvaluator, load_items

    model = AutoModelForCausalLM.from_pretrained(gemma_world["aligned"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gemma_world["aligned"])
    items, _ = load_items(gemma_world["data"] / "select.jsonl")
    items = [{**it, "question": it["question"] + " tell me" * (i % 3)}
             for i, it in enumerate(items)]
    batched = MCEvaluator(tok, items, batch_size=5).letter_logprobs(model.eval())
    alone = MCEvaluator(tok, items, batch_size=1).letter_logprobs(model)
    assert len({len(p) for p in MCEvaluator(tok, items).prompts}) == 3
    assert batched == pytest.approx(alone, abs=1e-5)

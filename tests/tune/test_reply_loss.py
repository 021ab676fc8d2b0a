"""Reply-only logits: the same loss and gradients as the model's own forward with the prompt
masked, on Llama and on Gemma 3 with final logit soft-capping."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from calibserve.tune.data import Encoder, collate, encode, load_records
from calibserve.tune.errors import InvalidConfig
from calibserve.tune.reply_loss import (
    causal_parts,
    check_reply_logits,
    full_logits_loss,
    reply_logits,
    reply_loss,
)
from calibserve.tune.templates import GEMMA_CHAT_TEMPLATE
from tests.tune.conftest import chat_item, gemma3, llama, make_tokenizer, mc_item, short_item


def batch_of_mixed_lengths(tmp_path: Any) -> tuple[Any, int]:
    tok = make_tokenizer()
    rng = random.Random(3)
    rows = [mc_item(rng), short_item(rng), chat_item(rng), mc_item(rng), short_item(rng)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoded = encode(load_records([path]), Encoder(tok, GEMMA_CHAT_TEMPLATE), 256)
    lengths = {len(e.ids) for e in encoded.examples}
    assert len(lengths) > 1  # padding is exercised
    return collate(encoded.examples, pad_id=0), len(tok)


@pytest.mark.parametrize("arch", ["llama", "llama-untied", "gemma3-softcap"])
def test_reply_only_loss_equals_masked_full_loss(tmp_path: Any, arch: str) -> None:
    batch, vocab = batch_of_mixed_lengths(tmp_path)
    torch.manual_seed(1)
    model = {"llama": lambda: llama(vocab), "llama-untied": lambda: llama(vocab, tie=False),
             "gemma3-softcap": lambda: gemma3(vocab, softcap=30.0)}[arch]()
    if arch.startswith("gemma3"):
        assert causal_parts(model)[2] == 30.0
    # Bigger weights than the random init make the soft-cap bite (|logit| near the cap).
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    model.eval()
    logits = reply_logits(model, batch)
    if arch.startswith("gemma3"):  # logits reach into the cap's bend (tanh(28/30) = 0.73)
        assert float(logits.detach().abs().max()) > 15.0
    ours = reply_loss(logits, batch).item()
    ref = full_logits_loss(model, batch).item()
    assert abs(ours - ref) < 1e-5
    assert ours > 0.1  # a real loss, not a degenerate zero
    # The gradients agree too (the point of the loss is its gradient).
    params = [p for p in model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(reply_loss(reply_logits(model, batch), batch), params)
    g_ref = torch.autograd.grad(full_logits_loss(model, batch), params)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_softcap_changes_the_loss(tmp_path: Any) -> None:
    """The soft-cap is applied: without it the same weights give another loss."""
    batch, vocab = batch_of_mixed_lengths(tmp_path)
    torch.manual_seed(1)
    capped = gemma3(vocab, softcap=5.0)
    with torch.no_grad():
        capped.get_output_embeddings().weight.mul_(40.0)
    uncapped = gemma3(vocab, softcap=None)
    uncapped.load_state_dict(capped.state_dict())
    a = reply_loss(reply_logits(capped.eval(), batch), batch)
    b = reply_loss(reply_logits(uncapped.eval(), batch), batch)
    assert abs(a.item() - b.item()) > 1e-2


def test_check_refuses_a_head_it_does_not_reproduce(tmp_path: Any) -> None:
    batch, vocab = batch_of_mixed_lengths(tmp_path)
    torch.manual_seed(1)
    model = llama(vocab)
    assert check_reply_logits(model, batch) < 1e-4

    class Scaled(type(model)):  # type: ignore[misc]
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    scaled = Scaled(model.config)
    scaled.load_state_dict(model.state_dict())
    with pytest.raises(InvalidConfig) as err:
        check_reply_logits(scaled, batch)
    assert err.value.param == "--model"


def test_reply_positions_are_the_reply_tokens(tmp_path: Any) -> None:
    """Targets are exactly each example's reply tokens, predicted from the token before each."""
    batch, _ = batch_of_mixed_lengths(tmp_path)
    for r, c, t in zip(batch.rows.tolist(), batch.cols.tolist(), batch.targets.tolist(),
                       strict=True):
        assert batch.input_ids[r, c + 1] == t
        assert batch.attention_mask[r, c + 1] == 1
    assert batch.rows.tolist() == sorted(batch.rows.tolist())
    assert batch.first.tolist()[0] == 0


def test_option_view_reads_the_first_reply_token_at_the_letters(tmp_path: Any) -> None:
    """What the calibration-aware objective sees: per MC row, the logits of the position that
    predicts the first reply token, at the tokens A, B, C, D, and the gold option."""
    from calibserve.tune.objective import option_view

    batch, vocab = batch_of_mixed_lengths(tmp_path)
    tok = make_tokenizer()
    torch.manual_seed(1)
    model = llama(vocab).eval()
    with torch.no_grad():
        logits = reply_logits(model, batch)
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    view = option_view(logits, batch)
    letters = tok.convert_tokens_to_ids(["A", "B", "C", "D"])
    assert view.logits.shape == (len(batch.mc_rows), 4)
    for m, r in enumerate(batch.mc_rows.tolist()):
        pos = int(batch.cols[batch.first[r]])
        assert tok.convert_ids_to_tokens(int(batch.input_ids[r, pos + 1])) \
            == "ABCD"[int(batch.gold[m])]
        torch.testing.assert_close(view.logits[m], full[r, pos, letters], atol=1e-5, rtol=1e-5)


def test_rcft_on_a_batch_without_multiple_choice_is_the_weighted_sft_loss(tmp_path: Any) -> None:
    """Length-grouped batches can hold no multiple-choice row: the calibration term is then 0."""
    from calibserve.tune.calibration_aware import BinAccuracy
    from calibserve.tune.objective import Objective

    tok = make_tokenizer()
    rng = random.Random(5)
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps(short_item(rng)) + "\n" for _ in range(3)))
    examples = encode(load_records([path]), Encoder(tok, GEMMA_CHAT_TEMPLATE), 256).examples
    batch = collate(examples, pad_id=0)
    assert batch.option_ids.shape == (0, 1)
    torch.manual_seed(1)
    logits = reply_logits(llama(len(tok)).eval(), batch)
    bins = BinAccuracy.from_confidences(torch.tensor([0.3, 0.9]), torch.tensor([1, 0]))
    loss = Objective("rcft", 0.25, None).loss(logits, batch, bins)
    torch.testing.assert_close(loss, 0.75 * reply_loss(logits, batch))

"""Logits and loss only where the loss is: at the positions that predict reply tokens.

A causal LM's forward applies the output head to every position. With a large vocabulary that
is most of a training step (Gemma 3 270M: a 262,144 x 640 head against about 100 M parameters in
the layers), yet only the few reply positions carry loss. So the model body (`get_decoder()`:
embedding, layers, final norm) runs on the whole sequence, its hidden states are gathered at
the reply positions, and the head, followed by the final logit soft-capping the config asks for
(Gemma 2 and 3 configs may set `final_logit_softcapping`; `tanh(z / c) * c`, as the model's own
forward applies it), runs there only. The result equals the masked loss of the full forward
(tests/tune), at a fraction of the cost.

`check_reply_logits` compares both on one example before training, so an architecture that does
something else after its head (a logit scale, say) is refused instead of trained wrongly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from calibserve.tune.data import Batch
from calibserve.tune.errors import InvalidConfig

__all__ = ["causal_parts", "reply_logits", "reply_loss", "full_logits_loss",
           "check_reply_logits"]


def causal_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """(body, output head, final logit soft-cap) of a causal LM, or of a peft model around one
    (its layers carry the adapters in place, so the base model's body runs them)."""
    unwrap = getattr(model, "get_base_model", None)
    base: Any = unwrap() if callable(unwrap) else model
    body = base.get_decoder()
    head = base.get_output_embeddings()
    if body is None or head is None:
        raise InvalidConfig(f"{type(base).__name__} has no decoder body and output head to "
                            "split", "--model")
    cap = getattr(base.config, "final_logit_softcapping", None)
    return body, head, (float(cap) if cap else None)


def reply_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """[N, V] float32 logits at the positions that predict the batch's reply tokens."""
    body, head, cap = causal_parts(model)
    out = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out.last_hidden_state[batch.rows, batch.cols]
    logits: torch.Tensor = head(hidden).float()
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def reply_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's reply tokens (every reply token weighs the same)."""
    return F.cross_entropy(logits, batch.targets)


def full_logits_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The reference: the model's own forward over every position, prompt and padding masked."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   use_cache=False).logits.float()
    labels = torch.full(batch.input_ids.shape, -100, dtype=torch.long, device=logits.device)
    labels[batch.rows, batch.cols] = batch.targets
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=-100)


@torch.no_grad()
def check_reply_logits(model: torch.nn.Module, batch: Batch, tolerance: float = 1e-3) -> float:
    """Largest difference between reply-only logits and the full forward's at the same positions
    (float32, no autocast); refuse the model if it exceeds `tolerance`."""
    was_training = model.training
    model.eval()
    try:
        ours = reply_logits(model, batch)
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False).logits.float()[batch.rows, batch.cols]
    finally:
        model.train(was_training)
    diff = float((ours - full).abs().max())
    scale = 1.0 + float(full.abs().max())
    if not diff <= tolerance * scale:
        raise InvalidConfig(
            f"reply-only logits differ from the model's own by {diff:.3g}: this architecture "
            "does something after its output head that calibserve tune does not reproduce",
            "--model")
    return diff

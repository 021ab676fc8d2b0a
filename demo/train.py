"""Training loops for the tiny Llamas: packed next-token pretraining and chat-format SFT.

Both loops are single-process and seeded through one torch generator, so the same settings and
seed give bit-identical weights (with a fixed thread count and deterministic algorithms).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from calibserve.demo.settings import ModelSettings, PretrainSettings, SFTSettings

Tick = Callable[[float], None]  # called after each step with the loss


def make_model(
    settings: ModelSettings, vocab_size: int, pad_id: int, eos_id: int
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        head_dim=settings.hidden_size // settings.num_attention_heads,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        dtype="float32",
    )
    return LlamaForCausalLM(config)


def _lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warm-up, then cosine decay to `floor` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # No decay on norms (1-d weights), as usual for transformers.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8)


def pretrain(
    model: LlamaForCausalLM,
    documents: Sequence[list[int]],
    eos_id: int,
    settings: PretrainSettings,
    generator: torch.Generator,
    tick: Tick | None = None,
    steps: int | None = None,
) -> float:
    """Next-token loss on documents packed into fixed-length rows (reshuffled every pass)."""
    total = settings.steps if steps is None else steps
    opt = _optimizer(model, settings.lr, settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, total, settings.warmup_steps, settings.min_lr_fraction)
    )
    rows_per_batch, width = settings.batch_size, settings.seq_len + 1
    buffer = torch.empty(0, dtype=torch.long)
    model.train()
    loss_value = float("nan")
    for _ in range(total):
        while buffer.numel() < rows_per_batch * width:
            order = torch.randperm(len(documents), generator=generator).tolist()
            stream = [t for i in order for t in (*documents[i], eos_id)]
            buffer = torch.cat([buffer, torch.tensor(stream, dtype=torch.long)])
        batch = buffer[: rows_per_batch * width].view(rows_per_batch, width)
        buffer = buffer[rows_per_batch * width :]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        if tick is not None:
            tick(loss_value)
    model.eval()
    return loss_value


def sft_steps(n_examples: int, settings: SFTSettings) -> int:
    return settings.epochs * math.ceil(n_examples / settings.batch_size)


def sft(
    model: LlamaForCausalLM,
    examples: Sequence[list[int]],
    pad_id: int,
    settings: SFTSettings,
    generator: torch.Generator,
    tick: Tick | None = None,
) -> float:
    """Loss only on each example's last two tokens: the answer and `<|end|>`."""
    opt = _optimizer(model, settings.lr, settings.weight_decay)
    model.train()
    loss_value = float("nan")
    for _ in range(settings.epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), settings.batch_size):
            chunk = [examples[i] for i in order[start : start + settings.batch_size]]
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for r, x in enumerate(chunk):
                ids[r, : len(x)] = torch.tensor(x)
                mask[r, : len(x)] = 1
                labels[r, len(x) - 2 : len(x)] = torch.tensor(x[-2:])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_value = float(loss.detach())
            if tick is not None:
                tick(loss_value)
    model.eval()
    return loss_value

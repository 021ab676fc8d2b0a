"""Writing the tuned model: a complete Hugging Face checkpoint, published atomically.

OUT gets float32 safetensors (LoRA adapters already merged), `config.json`,
`generation_config.json` (its end-of-sequence ids include the template's end-of-turn token, so
generation stops where a trained reply stops), the tokenizer unchanged id for id (merge needs
base and aligned to share it) with the chat template the run trained with
(`chat_template.jinja`), and `train_info.json`. Everything is written into a staging directory
beside OUT and renamed into place when complete: a failed or killed run leaves no OUT that looks
finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from calibserve.publish import publish_dir, staging

__all__ = ["write_checkpoint", "TRAIN_INFO", "stop_token_ids"]

TRAIN_INFO = "train_info.json"


def stop_token_ids(tokenizer: Any, reply_ids: list[int]) -> list[int]:
    """The special tokens a rendered reply ends with (`<end_of_turn>`, `<|im_end|>`, EOS)."""
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
    found: list[int] = []
    for i in reply_ids[1:]:
        if i in special and i not in found:
            found.append(i)
    return found


def _generation_eos(model: Any, extra: list[int]) -> None:
    config = getattr(model, "generation_config", None)
    if config is None or not extra:
        return
    eos = config.eos_token_id
    have = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    merged = have + [i for i in extra if i not in have]
    config.eos_token_id = merged[0] if len(merged) == 1 else merged


def write_checkpoint(model: Any, tokenizer: Any, template: str, info: dict[str, Any],
                     out: Path, stop_ids: list[int]) -> None:
    """Write the checkpoint and `train_info.json` to a staging directory, then publish it."""
    model = model.to(device="cpu", dtype=torch.float32)
    _generation_eos(model, stop_ids)
    with staging(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp)
        (tmp / TRAIN_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        publish_dir(tmp, out)

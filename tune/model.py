"""The model being tuned: loaded in float32, the embedding frozen, LoRA adapters or not, on a
device, with bf16 autocast where the hardware has native bf16.

Freezing the embedding freezes the output head too when the two are tied (Gemma, SmolLM2 and
most small models share one matrix): `--train-embedding` trains both, or the embedding alone when
untied. The output is always a plain model: LoRA adapters are merged into their base weights
before it is written (`plain_model`).
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from calibserve.tune.config import TuneConfig
from calibserve.tune.errors import InputNotFound, InvalidConfig

__all__ = [
    "Prepared",
    "resolve_device",
    "native_bf16",
    "load_tokenizer",
    "load_model",
    "prepare_model",
    "plain_model",
    "use_autocast",
    "cpu_threads",
    "device_name",
]


@dataclass(frozen=True, slots=True)
class Prepared:
    """The model to train and what was decided about it."""

    model: torch.nn.Module
    trainable: int  # parameters that receive gradients
    total: int  # parameters of the model as written (LoRA adapters not counted)
    embedding_frozen: bool
    head_tied: bool  # the output head is the embedding matrix


def resolve_device(spec: str) -> torch.device:
    """`auto`: CUDA when there is one, else the CPU; a named device must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfig("CUDA is not available on this machine", "--device")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise InvalidConfig(f"there is no {spec} (this machine has "
                            f"{torch.cuda.device_count()} CUDA devices)", "--device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidConfig("MPS is not available on this machine", "--device")
    return device


def cpu_threads(requested: int | None, available: int) -> int:
    """Threads for the CPU's kernels: `requested`, else the cores other work leaves free (cores
    minus the 1-minute load average, at least one). OpenMP threads wait for each other at every
    kernel, so when another process holds a core a thread sharing it stalls them all: with one
    other 2-thread job on this 2-core machine a Gemma 3 270M step took 9-39 s on two threads and
    3-4.5 s on one."""
    if requested is not None:
        return requested
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return available
    return max(1, min(available, available - round(busy)))


def native_bf16(device: torch.device) -> bool:
    """Does the device compute in bf16 natively? On a CPU without AVX-512 BF16 or AMX, bf16 is
    emulated and slower than float32, so autocast stays off there."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def use_autocast(mode: str, device: torch.device) -> bool:
    if mode == "off":
        return False
    native = native_bf16(device)
    if mode == "bf16" and device.type == "mps":
        raise InvalidConfig("bf16 autocast is not supported on MPS here", "--autocast")
    return True if mode == "bf16" else native


def device_name(device: torch.device) -> str:
    """A human name of the device for train_info.json."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        return found.group(1).strip() if found else (platform.processor() or "cpu")
    return device.type


def _source_error(model: str, exc: Exception) -> InputNotFound:
    where = Path(model)
    if where.exists() and not (where / "config.json").is_file():
        return InputNotFound(f"{model} has no config.json: not a checkpoint", "--model")
    return InputNotFound(f"cannot load {model!r}: {exc}", "--model")


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise _source_error(model, exc) from None


def load_model(model: str) -> torch.nn.Module:
    """The checkpoint as a float32 causal LM (the weights are trained and written in float32)."""
    from transformers import AutoModelForCausalLM

    try:
        loaded: torch.nn.Module = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise _source_error(model, exc) from None
    return loaded


def _count(params: Any) -> int:
    return sum(int(p.numel()) for p in params)


def prepare_model(model: Any, config: TuneConfig, device: torch.device) -> Prepared:
    """Freeze what the recipe keeps fixed, add LoRA adapters if asked, move to `device`."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    total = _count(model.parameters())
    if config.method == "lora":
        if config.train_embedding:
            raise InvalidConfig("LoRA trains adapters only; use --method full to train the "
                                "embedding", "--train-embedding")
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_scale,
                          target_modules=config.target_modules, lora_dropout=0.0, bias="none")
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:  # target modules not found
            raise InvalidConfig(str(exc).splitlines()[0], "--lora-targets") from None
    elif not config.train_embedding:
        embedding.weight.requires_grad_(False)
    model.to(device)
    trainable = _count(p for p in model.parameters() if p.requires_grad)
    return Prepared(model, trainable, total, not config.train_embedding, tied)


def plain_model(model: Any) -> Any:
    """The transformers model to write: LoRA adapters merged into the weights they adapt."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model

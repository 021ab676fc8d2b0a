"""GGUF to a Hugging Face safetensors checkpoint (float32), with the tokenizer and chat template.

transformers dequantizes a GGUF on load (`gguf_file=`) but refuses `save_pretrained` on the
loaded model, so the state dict is copied into a fresh `from_config` model whose config has no
`quantization_config`, and that one is saved. What transformers does not carry over from the
GGUF metadata is set on the tokenizer before saving: the chat template
(`tokenizer.chat_template`) and BOS/EOS insertion (`tokenizer.ggml.add_bos_token`, ...).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from benchmarks.realworld.errors import ConversionFailed

__all__ = ["Converted", "convert_gguf", "gguf_tokenizer_metadata"]


@dataclass(frozen=True, slots=True)
class Converted:
    """What a conversion produced, for info.json and the README's table."""

    architecture: str
    parameters: int
    vocab_size: int
    chat_template: str | None  # "tokenizer" (carried over), "gguf metadata" (set by us), None
    add_bos_token: bool  # whether the saved tokenizer starts every encoding with BOS
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "parameters": self.parameters,
            "vocab_size": self.vocab_size,
            "chat_template": self.chat_template,
            "add_bos_token": self.add_bos_token,
            "convert_seconds": round(self.seconds, 1),
        }


@contextmanager
def _fast_quiet_gguf_loading() -> Iterator[None]:
    """While converting: parse each GGUF once, build each tensor-name map once, no tqdm bar.

    transformers parses the GGUF header once per `from_pretrained` call (tokenizer, config,
    weights), and gguf-py's parse of a 49k-262k-token vocabulary costs seconds to tens of
    seconds on a small CPU each time; it also rebuilds `gguf.get_tensor_name_map(arch, blocks)`
    for every module of the model (397 times for SmolLM2, about 8 s). Both objects are
    read-only (the reader is a memory map), so sharing them is safe. transformers imports both
    names from `gguf` at call time, so swapping the module attributes is enough; should that
    change, this only stops saving time. Its own dequantization bar would break our progress
    display (the fetch shows one bar per target).
    """
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    reader_class = gguf.GGUFReader
    name_map = gguf.get_tensor_name_map
    bar = getattr(gguf_utils, "tqdm", None)
    readers: dict[tuple[str, str], Any] = {}
    maps: dict[tuple[Any, int], Any] = {}

    def shared_reader(path: os.PathLike[str] | str, mode: Literal["r", "r+", "c"] = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    def shared_name_map(arch: Any, n_blocks: int) -> Any:
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = name_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader = shared_reader  # type: ignore[misc,assignment]
    gguf.get_tensor_name_map = shared_name_map
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.GGUFReader = reader_class  # type: ignore[misc]
        gguf.get_tensor_name_map = name_map
        if bar is not None:
            gguf_utils.tqdm = bar
        readers.clear()
        maps.clear()


def gguf_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The GGUF metadata a converted tokenizer must honour: chat template, BOS/EOS insertion."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    out: dict[str, Any] = {}
    for key, name in (
        ("tokenizer.chat_template", "chat_template"),
        ("tokenizer.ggml.add_bos_token", "add_bos_token"),
        ("tokenizer.ggml.add_eos_token", "add_eos_token"),
    ):
        field = fields.get(key)
        if field is not None:
            out[name] = field.contents()
    template = out.get("chat_template")
    if not (isinstance(template, str) and template.strip()):
        out.pop("chat_template", None)
    return out


def _adds(tokenizer: Any, token_id: int | None, where: int) -> bool:
    ids = tokenizer("a")["input_ids"]
    return token_id is not None and len(ids) > 1 and ids[where] == token_id


def _honour_metadata(tokenizer: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Set what transformers does not carry over from the GGUF (Gemma's GGUF asks for BOS, its
    converted tokenizer would not add it; a base Gemma without BOS degenerates)."""
    if tokenizer.chat_template:
        template = "tokenizer"
    elif "chat_template" in meta:
        tokenizer.chat_template = meta["chat_template"]
        template = "gguf metadata"
    else:
        template = None
    for flag, token_id, where in (
        ("add_bos_token", tokenizer.bos_token_id, 0),
        ("add_eos_token", tokenizer.eos_token_id, -1),
    ):
        want = meta.get(flag)
        if isinstance(want, bool) and _adds(tokenizer, token_id, where) != want:
            setattr(tokenizer, flag, want)
            if _adds(tokenizer, token_id, where) != want:
                raise ConversionFailed(f"cannot set {flag}={want} on {type(tokenizer).__name__}")
    return {
        "chat_template": template,
        "add_bos_token": _adds(tokenizer, tokenizer.bos_token_id, 0),
        "add_eos_token": _adds(tokenizer, tokenizer.eos_token_id, -1),
    }


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def convert_gguf(gguf_path: Path, dest: Path) -> Converted:
    """Write `dest` (an existing empty directory): config, float32 safetensors, tokenizer."""
    started = time.monotonic()
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs it)
        import gguf  # noqa: F401
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ConversionFailed(
            f"converting GGUF needs transformers with gguf and accelerate ({exc}); "
            "pip install gguf accelerate"
        ) from exc
    _quiet_transformers()
    folder, name = str(gguf_path.parent), gguf_path.name
    with _fast_quiet_gguf_loading(), torch.inference_mode():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32
            )
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise ConversionFailed(f"transformers cannot load {gguf_path}: {exc}") from exc
        special = _honour_metadata(tokenizer, gguf_tokenizer_metadata(gguf_path))
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = loaded.state_dict()
        result = model.load_state_dict(state, strict=False)
        # A tied output head (= the embedding) may be reported missing under its own name.
        ties = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
        missing = [k for k in result.missing_keys if not (ties and k == "lm_head.weight")]
        if missing or result.unexpected_keys:
            raise ConversionFailed(
                f"{gguf_path}: state dict does not fit {type(model).__name__}: "
                f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
        del loaded, state
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
    parameters = sum(p.numel() for p in model.parameters())
    return Converted(
        architecture=type(model).__name__,
        parameters=int(parameters),
        vocab_size=int(model.config.get_text_config().vocab_size),
        chat_template=special["chat_template"],
        add_bos_token=special["add_bos_token"],
        seconds=time.monotonic() - started,
    )

"""The in-memory evaluation model: one live copy of the architecture plus both parents.

The live model is built from the aligned config (so chat template, vocabulary and heads are the
served ones) and its parameter tensors are overwritten in place for every lambda.

A checkpoint's tensor names are not always the model's parameter names: transformers renames
some layouts when it loads them (Gemma 3's multimodal checkpoints store
`language_model.model.layers...`, `vision_tower...`, which `Gemma3ForConditionalGeneration`
holds as `model.language_model.layers...`, `model.vision_tower...`). `checkpoint_renamer` asks
the installed transformers for the same renaming it applies on load, so the live parameter each
stored tensor sets is the one `from_pretrained` would set. The written checkpoint keeps the
aligned model's own names. A tensor transformers would have to convert (split or fuse) on load
has no one live parameter: such a layout is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from calibserve.merge.checkpoint import PairPlan, TensorPlan
from calibserve.merge.errors import IncompatibleCheckpoints, InvalidConfig
from calibserve.merge.interpolate import InPlaceInterpolator, Method
from calibserve.merge.tensorfile import read_rows, read_tensor

__all__ = ["EvalModel", "checkpoint_renamer", "resolve_dtype", "load_eval_model", "read_parent"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidConfig("CUDA was asked for but torch sees no GPU", "--device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InvalidConfig("MPS was asked for but is not available", "--device")


def read_parent(t: TensorPlan, which: str) -> torch.Tensor:
    """A parent's full tensor; for the base, rows only the aligned model has come from it."""
    if which == "aligned":
        return read_tensor(t.aligned)
    if not t.grown:
        return read_tensor(t.base)
    head = read_rows(t.base, 0, t.base_rows).to(t.aligned.torch_dtype)
    return torch.cat([head, read_rows(t.aligned, t.base_rows, t.shape[0])])


def checkpoint_renamer(model: Any, names: Iterable[str]) -> Callable[[str], str | None]:
    """Checkpoint tensor name -> the model's parameter (or buffer) name, as transformers renames
    on load; None for a tensor it would convert (split, fuse) rather than rename."""
    names = list(names)
    try:  # transformers >= 5: the conversion mapping of every sub-model
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        found: dict[str, str | None] = {}
        for name in names:
            new, converted = rename_source_key(name, renamings, converters, prefix, meta)
            found[name] = None if converted is not None else str(new)
        return lambda name: found.get(name, name)
    except (ImportError, AttributeError, TypeError, ValueError):
        pass
    # transformers 4.x: a class attribute of regex -> replacement (first match wins).
    mapping: dict[str, str] = dict(getattr(model, "_checkpoint_conversion_mapping", None) or {})

    def rename(name: str) -> str | None:
        for pattern, replacement in mapping.items():
            new, n = re.subn(pattern, replacement, name)
            if n:
                return new
        return name

    return rename


@dataclass
class EvalModel:
    model: torch.nn.Module
    interpolator: InPlaceInterpolator

    def set(self, lam: float) -> None:
        self.interpolator.set(lam)


def load_eval_model(plan: PairPlan, method: Method, dtype: torch.dtype, device: str) -> EvalModel:
    """Build the live model and load both parents (three copies of the weights in memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(plan.aligned.path)
    cfg.tie_word_embeddings = plan.tied
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    live = dict(model.named_parameters(remove_duplicate=False))
    live.update(dict(model.named_buffers(remove_duplicate=False)))
    rename = checkpoint_renamer(model, (t.name for t in plan.tensors))
    converted = sorted(t.name for t in plan.tensors if rename(t.name) is None)
    if converted:
        raise IncompatibleCheckpoints(
            f"transformers converts (splits or fuses) {', '.join(converted[:8])} when it loads "
            f"{type(model).__name__}: that layout cannot be interpolated in place",
            "--aligned",
        )
    where = {t.name: str(rename(t.name)) for t in plan.tensors}
    unknown = sorted(name for name, dest in where.items() if dest not in live)
    if unknown:
        raise IncompatibleCheckpoints(
            f"the model class {type(model).__name__} has no parameters named "
            f"{', '.join(unknown[:8])}: unsupported checkpoint layout",
            "--aligned",
        )
    # A parameter the checkpoint does not set would stay randomly initialised: refuse.
    seen: set[int] = {id(live[dest]) for dest in where.values()}
    uncovered = [n for n, p in model.named_parameters() if id(p) not in seen]
    if uncovered:
        raise IncompatibleCheckpoints(
            f"the checkpoints do not provide {', '.join(uncovered[:8])}", "--aligned"
        )
    targets = []
    for t in plan.tensors:
        dest = live[where[t.name]]
        b = read_parent(t, "aligned").to(device=device)
        if not t.interpolated:
            dest.data.copy_(b)
            continue
        a = read_parent(t, "base").to(device=device, dtype=dtype)
        targets.append((t.name, dest, a, b.to(dtype=dtype)))
    return EvalModel(model, InPlaceInterpolator(targets, method))

"""The in-memory evaluation model: one live copy of the architecture plus both parents.

The live model is built from the aligned config (so chat template, vocabulary and heads are the
served ones) and its parameter tensors are overwritten in place for every lambda.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibserve.merge.checkpoint import PairPlan, TensorPlan
from calibserve.merge.errors import IncompatibleCheckpoints, InvalidConfig
from calibserve.merge.interpolate import InPlaceInterpolator, Method
from calibserve.merge.tensorfile import read_rows, read_tensor

__all__ = ["EvalModel", "resolve_dtype", "load_eval_model", "read_parent"]

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
    planned = {t.name for t in plan.tensors}
    unknown = sorted(planned - set(live))
    if unknown:
        raise IncompatibleCheckpoints(
            f"the model class {type(model).__name__} has no parameters named "
            f"{', '.join(unknown[:8])}: unsupported checkpoint layout",
            "--aligned",
        )
    # A parameter the checkpoint does not set would stay randomly initialised: refuse.
    seen: set[int] = {id(live[name]) for name in planned}
    uncovered = [n for n, p in model.named_parameters() if id(p) not in seen]
    if uncovered:
        raise IncompatibleCheckpoints(
            f"the checkpoints do not provide {', '.join(uncovered[:8])}", "--aligned"
        )
    targets = []
    for t in plan.tensors:
        dest = live[t.name]
        b = read_parent(t, "aligned").to(device=device)
        if not t.interpolated:
            dest.data.copy_(b)
            continue
        a = read_parent(t, "base").to(device=device, dtype=dtype)
        targets.append((t.name, dest, a, b.to(dtype=dtype)))
    return EvalModel(model, InPlaceInterpolator(targets, method))

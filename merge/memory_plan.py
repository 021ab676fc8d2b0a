"""The memory plan of a merge, before anything is loaded: bytes per device, per evaluator and
tensor-parallel size (`calibserve merge --dry-run`), and the refusal of a run that cannot fit.

Sizes come from the parents' safetensors headers when their weights are there, else from
config.json alone (`estimate_params`: an architecture count for decoder-only transformers and
SigLIP-style vision towers), so a plan for a model too large for this machine needs only its
config. What each evaluator holds on one device:

- transformers (one device): the live model plus both parents, three copies in the evaluation
  dtype (merge/model.py); activations come on top.
- vllm, tensor parallelism N: the live model's shard (weights / N), the reload scratch (vLLM's
  layerwise reload materialises one layer's shard beside the kernel tensors it replaces: at most
  the largest tensor / N), and the KV cache (`KV_TOKENS` tokens of full attention, heads split
  over N). The parents never reach a device: each rank reads them from the memory-mapped
  checkpoint files (page cache, shared by the ranks of a node) one tensor at a time
  (merge/engine_worker.py); the host needs three float32 copies of the largest tensor per rank.
- vllm with P pipeline stages (`--pipeline-parallel-size`, several nodes): each stage holds
  about 1 / P of the layers, so weights / (N x P) and the KV cache of layers / P; the reload
  scratch stays the largest tensor / N (the embedding lives on one stage whole). An estimate:
  stages are cut at layer boundaries and the first and last hold the embedding and head.

On CPU, vLLM's KV cache is what VLLM_CPU_KVCACHE_SPACE says (GiB), not a fraction of memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibserve.merge.config import MergeConfig, parse_size
from calibserve.merge.errors import IncompatibleCheckpoints, InputNotFound, InvalidConfig

__all__ = ["ModelSize", "Row", "estimate_params", "model_size", "plan_rows", "check_plan",
           "KV_TOKENS"]

# The KV cache planned for the vLLM evaluator: 64 sequences of 1,024 tokens in flight (the
# sweep's prompts are a few hundred tokens; vLLM needs at least one max_model_len).
KV_TOKENS = 64 * 1024
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TP_SIZES = (1, 2, 4, 8)
GB = 10**9


@dataclass(frozen=True)
class ModelSize:
    """What the plan needs of a model: parameters, the largest tensor, the KV shape."""

    params: int
    largest: int  # elements of the largest tensor (usually the embedding)
    layers: int
    kv_heads: int
    head_dim: int
    source: str  # "safetensors headers" or "config.json"


def _text(cfg: dict[str, Any]) -> dict[str, Any]:
    inner = cfg.get("text_config")
    return {**cfg, **inner} if isinstance(inner, dict) else cfg


def _vision_params(v: dict[str, Any], text_hidden: int) -> int:
    """A SigLIP-style vision tower and its projector into the text model."""
    h = int(v.get("hidden_size", 0))
    if not h:
        return 0
    inter = int(v.get("intermediate_size", 4 * h))
    layers = int(v.get("num_hidden_layers", 0))
    patch = int(v.get("patch_size", 14))
    image = int(v.get("image_size", 224))
    channels = int(v.get("num_channels", 3))
    per_layer = 4 * h * h + 4 * h + 2 * h * inter + inter + h + 4 * h  # attn, mlp, 2 norms
    embed = channels * patch * patch * h + h + (image // patch) ** 2 * h
    return layers * per_layer + embed + 2 * h + h * text_hidden


def estimate_params(cfg: dict[str, Any]) -> ModelSize:
    """Parameter count of a decoder-only transformer (plus vision tower) from its config."""
    t = _text(cfg)
    try:
        h = int(t["hidden_size"])
        layers = int(t["num_hidden_layers"])
        heads = int(t["num_attention_heads"])
        vocab = int(t["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IncompatibleCheckpoints(f"config.json lacks {exc} to size the model from",
                                      "--aligned") from None
    kv = int(t.get("num_key_value_heads") or heads)
    hd = int(t.get("head_dim") or h // heads)
    inter = int(t.get("intermediate_size") or 4 * h)
    attn = h * hd * (heads + 2 * kv) + heads * hd * h
    mlp = 3 * h * inter  # gated (gate, up, down)
    kind = str(t.get("model_type", ""))
    # Llama-style: two norms a layer; Gemma 2 adds two post-norms, Gemma 3 also q/k norms.
    norms = 4 * h + 2 * hd if kind.startswith("gemma3") else 4 * h if kind.startswith(
        "gemma") else 2 * h
    embed = vocab * h
    tied = bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", True)))
    total = layers * (attn + mlp + norms) + embed * (1 if tied else 2) + h
    vision = cfg.get("vision_config")
    if isinstance(vision, dict):
        total += _vision_params(vision, h)
    return ModelSize(total, max(embed, h * inter), layers, kv, hd, "config.json")


def _local_dir(ref: str, param: str) -> Path:
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(ref, "config.json")).parent
    except Exception as exc:  # any hub failure is the same refusal for the user
        raise InputNotFound(f"{ref} is not a directory and its config.json cannot be fetched "
                            f"({type(exc).__name__})", param) from None


def model_size(ref: str, param: str = "--aligned") -> ModelSize:
    """From safetensors headers when the weights are there, else from config.json."""
    path = _local_dir(ref, param)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InputNotFound(f"{path} has no config.json: not a Hugging Face checkpoint", param)
    cfg = json.loads(cfg_path.read_text())
    est = estimate_params(cfg)
    if not list(path.glob("*.safetensors")):
        return est
    from calibserve.merge.checkpoint import open_checkpoint

    ck = open_checkpoint(str(path), param)
    numels = [info.numel for info in ck.tensors.values()]
    return ModelSize(sum(numels), max(numels), est.layers, est.kv_heads, est.head_dim,
                     "safetensors headers")


@dataclass(frozen=True)
class Row:
    """One evaluator at one tensor-parallel size (and pipeline stages): bytes per device."""

    evaluator: str
    tp: int
    weights: int
    parents: int
    scratch: int
    kv_cache: int
    pp: int = 1

    @property
    def total(self) -> int:
        return self.weights + self.parents + self.scratch + self.kv_cache


def plan_rows(size: ModelSize, dtype: str, tp_sizes: tuple[int, ...],
              cpu_kv_bytes: int | None = None, pp: int = 1) -> list[Row]:
    """The transformers row and one vLLM row per tensor-parallel size (each with `pp`
    pipeline stages)."""
    b = DTYPE_BYTES[dtype]
    w = size.params * b
    rows = [Row("transformers", 1, w, 2 * w, 0, 0)]
    layers = -(-size.layers // pp)
    for n in tp_sizes:
        kv_heads = max(1, size.kv_heads // n)
        per_token = 2 * layers * kv_heads * size.head_dim * b
        kv = cpu_kv_bytes if cpu_kv_bytes is not None else per_token * KV_TOKENS
        rows.append(Row("vllm", n, -(-w // (n * pp)), 0, -(-size.largest * b // n), kv, pp))
    return rows


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB // 10 else f"{n / 10**6:.1f} MB"


def _device_memory(spec: str | None, on_gpu: bool) -> tuple[int, str]:
    if spec is not None:
        try:
            return parse_size(spec), "--device-memory"
        except InvalidConfig as exc:
            raise InvalidConfig(exc.message, "--device-memory") from None
    if on_gpu:
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory), "GPU 0"
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages), "host RAM"


def _on_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return False


def check_plan(config: MergeConfig, device_memory: str | None, refuse: bool) -> str:
    """The plan as printed by --dry-run; with `refuse`, raise `InvalidConfig` naming the flag
    to change when the configured evaluator cannot fit."""
    on_gpu = _on_gpu() and config.device != "cpu"
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    size = model_size(config.aligned)
    memory, where = _device_memory(device_memory, on_gpu)
    util = config.gpu_memory_utilization or 0.9
    if not on_gpu and device_memory is None:
        util = 1.0  # on CPU the engine's share is its weights plus VLLM_CPU_KVCACHE_SPACE
    cpu_kv = None
    if not on_gpu and device_memory is None:
        cpu_kv = int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * 2**30)
    tps = tuple(sorted({*TP_SIZES, config.tensor_parallel_size}))
    pp = config.pipeline_parallel_size
    rows = plan_rows(size, dtype, tps, cpu_kv, pp)
    share = (f"the vLLM engine may take {util:g} of it, --gpu-memory-utilization" if util < 1
             else "vLLM's CPU KV cache is VLLM_CPU_KVCACHE_SPACE GiB")
    lines = [
        f"memory plan, bytes per device ({size.params / 1e6:,.1f} M parameters from "
        f"{size.source}, {dtype}; device memory {_gb(memory)} from {where}; {share})",
        f"{'evaluator':<13}{'TP':>3}{'PP':>3}  {'weights':>10}{'parents':>10}{'reload':>10}"
        f"{'KV cache':>10}{'total':>10}  fits",
    ]
    chosen: Row | None = None
    for r in rows:
        budget = memory * (util if r.evaluator == "vllm" else 1.0)
        mine = r.evaluator == config.evaluator and r.tp == config.tensor_parallel_size
        chosen = r if mine else chosen
        lines.append(
            f"{r.evaluator:<13}{r.tp:>3}{r.pp:>3}  {_gb(r.weights):>10}{_gb(r.parents):>10}"
            f"{_gb(r.scratch):>10}{_gb(r.kv_cache):>10}{_gb(r.total):>10}  "
            f"{'yes' if r.total <= budget else 'no'}{'  <- this run' if mine else ''}")
    assert chosen is not None
    budget = int(memory * (util if chosen.evaluator == "vllm" else 1.0))
    fits = chosen.total <= budget
    stages = f" and {chosen.pp} pipeline stages" if chosen.pp > 1 else ""
    verdict = (f"{chosen.evaluator} at tensor parallelism {chosen.tp}{stages}: needs "
               f"{_gb(chosen.total)} per device of {_gb(budget)} usable: "
               f"{'fits' if fits else 'does not fit'}")
    lines.append(verdict)
    if refuse and not fits:
        flag = "--tensor-parallel-size" if chosen.evaluator == "vllm" else "--evaluator"
        hint = ("raise --tensor-parallel-size (devices a node) or --pipeline-parallel-size "
                "(nodes)" if flag != "--evaluator" else
                "use --evaluator vllm (the parents stay off the device)")
        raise InvalidConfig(f"{verdict} ({hint}; --dry-run prints the plan)", flag)
    return "\n".join(lines)

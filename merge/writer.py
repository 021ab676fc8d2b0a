"""Write the merged checkpoint tensor by tensor, never holding more than one row chunk.

Every output size is known before a byte is written, so each shard's safetensors header is
written first and tensors are then streamed into it: read a chunk of rows from each parent
(`os.preadv`, no mmap), interpolate in float32, cast to the output dtype, append. Peak memory is
a few chunks, whatever the model or shard size. Shards, index, config, generation config,
tokenizer, chat template and a model card go into `dest`, which the caller creates inside a
temporary directory and renames into place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from calibserve.merge.checkpoint import TOKENIZER_FILES, PairPlan, TensorPlan
from calibserve.merge.interpolate import Method, SlerpStats, interpolate_into, slerp_stats
from calibserve.merge.tensorfile import ShardLayout, read_rows, write_header, write_tensor_bytes

__all__ = ["plan_shards", "write_model", "compute_dtype", "CHUNK_BYTES"]

CHUNK_BYTES = 32 * 2**20  # bytes of one float64 chunk: bounds each of the 3 buffers
EXTRA_FILES = ("generation_config.json",)


def _row_chunks(t: TensorPlan) -> list[tuple[int, int]]:
    if not t.shape:
        return [(0, 1)]
    rows = t.shape[0]
    row_bytes = 8  # sized for float64, the widest compute dtype
    for d in t.shape[1:]:
        row_bytes *= d
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    return [(s, min(rows, s + step)) for s in range(0, rows, step)] or [(0, 0)]


class _Workspace:
    """Flat buffers reused for every chunk: the allocator never sees per-chunk churn, so the
    resident set stays at a few chunks instead of creeping up with fragmentation."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        buf = self._bufs.get((key, dtype))
        if buf is None or buf.numel() < numel:
            self._bufs.pop((key, dtype), None)
            buf = torch.empty(max(numel, 1), dtype=dtype)
            self._bufs[(key, dtype)] = buf
        return buf[:numel]


def _chunk_shape(t: TensorPlan, start: int, stop: int) -> tuple[int, ...]:
    return (stop - start, *t.shape[1:]) if t.shape else ()


def _load(
    ws: _Workspace, key: str, t: TensorPlan, which: str, start: int, stop: int, cd: torch.dtype
) -> torch.Tensor:
    """A parent's rows as `cd` in workspace buffer `key` (base rows past its vocabulary come
    from the aligned model)."""
    shape = _chunk_shape(t, start, stop)
    numel = _numel(shape)
    dest = ws.get(key, cd, numel).view(shape)
    raw = ws.get("raw", torch.uint8, numel * 8)
    if which == "aligned" or (t.grown and start >= t.base_rows):
        dest.copy_(read_rows(t.aligned, start, stop, raw))
    elif not t.grown or stop <= t.base_rows:
        dest.copy_(read_rows(t.base, start, stop, raw))
    else:
        split = t.base_rows - start
        dest[:split].copy_(read_rows(t.base, start, t.base_rows, raw))
        dest[split:].copy_(read_rows(t.aligned, t.base_rows, stop, raw))
    return dest


def compute_dtype(t: TensorPlan) -> torch.dtype:
    """What a tensor is interpolated in (float32, float64 for float64 parents), whatever it is
    stored in; the vLLM evaluator computes in it too, so the weights it sweeps are the written."""
    if t.base.torch_dtype == torch.float64 or t.aligned.torch_dtype == torch.float64:
        return torch.float64
    return torch.float32


def _stats(ws: _Workspace, t: TensorPlan) -> SlerpStats:
    total = SlerpStats(0.0, 0.0, 0.0)
    cd = compute_dtype(t)
    for start, stop in _row_chunks(t):
        a = _load(ws, "a", t, "base", start, stop, cd)
        b = _load(ws, "b", t, "aligned", start, stop, cd)
        total = total + slerp_stats(a, b)
    return total


def _stream_tensor(f: Any, ws: _Workspace, t: TensorPlan, lam: float, method: Method) -> None:
    out_dtype = t.aligned.torch_dtype
    if not t.interpolated:
        for start, stop in _row_chunks(t):
            write_tensor_bytes(f, read_rows(t.aligned, start, stop))
        return
    cd = compute_dtype(t)
    stats = _stats(ws, t) if method == "slerp" and lam not in (0.0, 1.0) else None
    for start, stop in _row_chunks(t):
        a = _load(ws, "a", t, "base", start, stop, cd)
        b = _load(ws, "b", t, "aligned", start, stop, cd)
        # The result overwrites a (elementwise, so aliasing is safe), then is cast into the
        # raw buffer: three chunk buffers in all, whatever the model size.
        out = interpolate_into(a, a, b, lam, method, stats)
        raw = ws.get("raw", torch.uint8, out.numel() * 8)
        cast = raw[: out.numel() * t.aligned.itemsize].view(out_dtype).view(out.shape)
        cast.copy_(out)
        write_tensor_bytes(f, cast)


def _itemsize(t: TensorPlan) -> int:
    return t.aligned.itemsize


def plan_shards(tensors: list[TensorPlan], shard_size: int) -> list[list[TensorPlan]]:
    """Greedy packing in checkpoint order; a tensor larger than `shard_size` gets its own shard."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        n = _itemsize(t)
        for d in t.shape:
            n *= d
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def write_model(
    plan: PairPlan,
    lam: float,
    method: Method,
    dest: Path,
    shard_size: int,
    model_card: str,
    on_bytes: Callable[[int], None] | None = None,
    durable: bool = True,
    extra_json: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Write the model at `lam` into the (new, empty) directory `dest`; returns weight files."""
    dest.mkdir(parents=True, exist_ok=False)
    shards = plan_shards(plan.tensors, shard_size)
    n = len(shards)
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    ws = _Workspace()
    for k, shard in enumerate(shards, 1):
        name = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        # Widest dtypes first keeps every tensor naturally aligned in the file.
        ordered = sorted(shard, key=lambda t: -_itemsize(t))
        layout = ShardLayout(name, tuple((t.name, t.dtype, t.shape) for t in ordered))
        path = dest / name
        with open(path, "wb") as f:
            write_header(f, layout, {"format": "pt"})
            for t in ordered:
                _stream_tensor(f, ws, t, lam, method)
                weight_map[t.name] = name
                if on_bytes is not None:
                    on_bytes(t.aligned.itemsize * max(1, _numel(t.shape)))
            if durable:
                f.flush()
                os.fsync(f.fileno())
        total += layout.nbytes
        files.append(path)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (dest / "config.json").write_text(json.dumps(plan.out_config(), indent=2) + "\n")
    src = plan.aligned.path
    for fname in (*EXTRA_FILES, *TOKENIZER_FILES):
        if (src / fname).is_file():
            shutil.copyfile(src / fname, dest / fname)
    (dest / "README.md").write_text(model_card)
    for fname, content in (extra_json or {}).items():
        (dest / fname).write_text(json.dumps(content, indent=2) + "\n")
    return files


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

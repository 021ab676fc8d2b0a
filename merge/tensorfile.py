"""The safetensors file format, read and written a slice at a time.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
`{dtype, shape, data_offsets}` (offsets relative to the end of the header), then the raw bytes.
Reading with `os.preadv` straight into a preallocated tensor, rather than memory-mapping, keeps
pages of the parents out of this process's resident set: the writer's peak memory is what it
holds, not how much of the input it has touched. Writing a header first (every size is known in
advance) lets the writer stream tensors to disk without ever holding a whole shard.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "TensorInfo",
    "read_header",
    "read_rows",
    "read_tensor",
    "ShardLayout",
    "write_header",
    "write_tensor_bytes",
]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # the reference implementation's own limit


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor's bytes live: file, absolute byte offset, dtype and shape."""

    name: str
    file: Path
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.torch_dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        return self.torch_dtype.is_floating_point


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor locations and `__metadata__` of one .safetensors file (raises ValueError)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise ValueError(f"{path} has an implausible header size {n}")
        header = json.loads(f.read(n))
    size = path.stat().st_size
    meta = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        dtype = entry["dtype"]
        if dtype not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        begin, end = entry["data_offsets"]
        info = TensorInfo(
            name, path, 8 + n + int(begin), dtype, tuple(int(d) for d in entry["shape"])
        )
        if end - begin != info.nbytes or info.offset + info.nbytes > size:
            raise ValueError(f"{path}: tensor {name} has inconsistent offsets (truncated file?)")
        tensors[name] = info
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got


def read_rows(
    info: TensorInfo, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows `[start, stop)` along dimension 0 (a 0-d tensor is read whole).

    Into a new tensor, or into the front of `buffer` (a flat uint8 tensor large enough), so a
    caller streaming many chunks reuses one allocation instead of churning the allocator.
    """
    row_shape: tuple[int, ...]
    if not info.shape:
        start, stop, row_shape = 0, 1, ()
    else:
        stop = info.shape[0] if stop is None else stop
        row_shape = info.shape[1:]
    row_numel = 1
    for d in row_shape:
        row_numel *= d
    count = (stop - start) * row_numel
    nbytes = count * info.itemsize
    if buffer is not None:
        if buffer.dtype != torch.uint8 or buffer.numel() < nbytes:
            raise ValueError(f"buffer too small for {nbytes} bytes of {info.name}")
        out = buffer[:nbytes]
    else:
        out = torch.empty(nbytes, dtype=torch.uint8)
    if count:
        with open(info.file, "rb", buffering=0) as f:
            _pread_into(
                f.fileno(), out.numpy().data, info.offset + start * row_numel * info.itemsize
            )
    tensor = out.view(info.torch_dtype)
    return (
        tensor.reshape(row_shape) if not info.shape else tensor.reshape((stop - start, *row_shape))
    )


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """The whole tensor, as a new tensor."""
    return read_rows(info)


@dataclass(frozen=True, slots=True)
class ShardLayout:
    """The planned content of one output file: names in write order with dtypes and shapes."""

    filename: str
    entries: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype, shape)

    @property
    def nbytes(self) -> int:
        total = 0
        for _, dtype, shape in self.entries:
            total += _nbytes(dtype, shape)
        return total


def _nbytes(dtype: str, shape: Iterable[int]) -> int:
    n = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    for d in shape:
        n *= d
    return n


def write_header(f: BinaryIO, layout: ShardLayout, metadata: dict[str, str]) -> None:
    """Write the header for `layout`; the caller then writes each tensor's bytes in order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for name, dtype, shape in layout.entries:
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)


def write_tensor_bytes(f: BinaryIO, tensor: torch.Tensor) -> None:
    """Append a tensor's raw little-endian bytes (C order)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel():
        f.write(flat.view(torch.uint8).numpy().data)

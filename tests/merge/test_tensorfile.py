"""The safetensors reader/writer agree with the reference library."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calibserve.merge.tensorfile import (
    ShardLayout,
    read_header,
    read_rows,
    write_header,
    write_tensor_bytes,
)


def test_streamed_file_loads_with_the_reference_library(tmp_path: Path) -> None:
    tensors = {
        "w16": torch.randn(7, 5).to(torch.float16),
        "wbf": torch.randn(3, 4).to(torch.bfloat16),
        "w32": torch.randn(11),
        "scalar": torch.tensor(3.5),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
    order = sorted(tensors, key=lambda n: -tensors[n].element_size())
    layout = ShardLayout(
        "x.safetensors", tuple((n, names[tensors[n].dtype], tuple(tensors[n].shape)) for n in order)
    )
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        write_header(f, layout, {"format": "pt"})
        for n in order:
            write_tensor_bytes(f, tensors[n])
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for n, t in tensors.items():
        assert loaded[n].dtype == t.dtype and torch.equal(loaded[n], t), n


def test_read_rows_matches_slices(tmp_path: Path) -> None:
    t = torch.randn(10, 3, 2).to(torch.bfloat16)
    save_file({"t": t, "s": torch.tensor(1.25)}, str(tmp_path / "a.safetensors"))
    infos, _ = read_header(tmp_path / "a.safetensors")
    assert torch.equal(read_rows(infos["t"], 2, 7), t[2:7])
    assert torch.equal(read_rows(infos["t"]), t)
    assert read_rows(infos["t"], 4, 4).shape == (0, 3, 2)
    assert float(read_rows(infos["s"])) == 1.25

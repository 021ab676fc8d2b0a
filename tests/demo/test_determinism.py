"""Same seed and settings give the same weights, byte for byte; another seed does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibserve.demo import build_world, tiny_settings
from calibserve.demo.cache import sha256_file

FILES = [f"{m}/model.safetensors" for m in ("base", "aligned", "expert")] + [
    "base/tokenizer.json", "data/test.jsonl", "data/select.jsonl",
]


def _hashes(home: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    # A private cache root per build, so the second build really trains instead of reusing.
    monkeypatch.setenv("CALIBSERVE_HOME", str(home))
    world = build_world(seed=seed, settings=tiny_settings(), progress=False)
    return {f: sha256_file(world / f) for f in FILES}


def test_same_seed_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _hashes(tmp_path / "a", 0, monkeypatch)
    second = _hashes(tmp_path / "b", 0, monkeypatch)
    assert first == second
    other = _hashes(tmp_path / "c", 1, monkeypatch)
    assert other["base/model.safetensors"] != first["base/model.safetensors"]
    assert other["data/test.jsonl"] != first["data/test.jsonl"]

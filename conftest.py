"""Settings for every test run, tests/ and benchmarks/tests/ alike.

One torch thread in the test process. The tests' models are tiny, so a second thread buys
nothing, and on two cores shared with a vLLM engine or another job the two threads contend:
the merge tests' module fixture took 40 s with two threads and 2.8 s with one on this machine
under load. The demo build and `calibserve tune` set their own thread counts, and vLLM engines
are separate processes.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:  # the test extra installs it; a test that needs it says so itself
        return
    torch.set_num_threads(1)

"""Fixtures for the demo-world tests: tiny worlds built in private cache roots."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibserve.demo import build_world, tiny_settings


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny world (seconds to build), in its own CALIBSERVE_HOME, shared by read-only tests."""
    home = tmp_path_factory.mktemp("tiny-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CALIBSERVE_HOME", str(home))
        return build_world(seed=0, settings=tiny_settings(), progress=False)

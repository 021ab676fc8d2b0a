"""Where built worlds live and how they are trusted: manifests, verification, locks, placement.

A world directory is complete only if its `manifest.json` (written last) lists every file with
its size and sha256 and they all match; anything else is rebuilt, never trusted. Builds happen in
a temporary directory next to the target and are renamed into place under an fcntl lock, so two
processes building the same world never see each other's half-written files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def home() -> Path:
    """Root of calibserve's caches: `$CALIBSERVE_HOME`, default `./.calibserve`."""
    return Path(os.environ.get("CALIBSERVE_HOME", ".calibserve"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listing(root: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in files
    }


def write_manifest(root: Path, digest: str, seed: int) -> None:
    """Record every file; written last, so its presence means the build finished."""
    manifest = {
        "version": MANIFEST_VERSION, "digest": digest, "seed": seed, "files": _listing(root)
    }
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, root / MANIFEST)


def verify(root: Path, digest: str | None = None) -> bool:
    """True only if the manifest is readable, matches `digest`, and every file matches it."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
        if manifest.get("version") != MANIFEST_VERSION or not files:
            return False
        if digest is not None and manifest.get("digest") != digest:
            return False
        for rel, meta in files.items():
            path = root / rel
            if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


@contextmanager
def locked(target: Path) -> Iterator[None]:
    """Exclusive lock on `<target>.lock`, held while the target is checked and (re)built."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A fresh temporary directory next to `target`; removed unless `place` consumed it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def place(tmp: Path, target: Path) -> None:
    """Move a finished build into place, replacing an old (untrusted) directory if present."""
    if target.exists() or target.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, target)

"""Where built worlds live and how they are trusted: manifests and verification.

A world directory is complete only if its `manifest.json` (written last) lists every file with
its size and sha256 and they all match; anything else is rebuilt, never trusted. The lock, the
staging directory and the rename into place are `calibserve.publish`'s, so two processes
building the same world never see each other's half-written files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from calibserve.publish import write_atomic

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
    write_atomic(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


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


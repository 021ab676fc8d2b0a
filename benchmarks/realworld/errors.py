"""The one exception hierarchy of the realworld fetch: every message names the file or step."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "FetchError",
    "ChecksumMismatch",
    "DownloadFailed",
    "SourceInvalid",
    "SourceUnavailable",
    "TargetsUnavailable",
    "ConversionFailed",
]


class FetchError(Exception):
    """A step of the fetch failed; the message says which and where (the CLI exits 1)."""


class ChecksumMismatch(FetchError):
    """A file's sha256 (or size) is not the one recorded in sources.py."""

    def __init__(self, path: Path | str, expected: str, actual: str, hint: str = "") -> None:
        self.path = Path(path)
        self.expected = expected
        self.actual = actual
        message = f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}"
        super().__init__(f"{message}; {hint}" if hint else message)


class DownloadFailed(FetchError):
    """pip (or the one direct download) did not yield the recorded file."""


class SourceInvalid(FetchError):
    """A fetched archive lacks a file it should hold, or the file cannot be read as expected."""


class SourceUnavailable(FetchError):
    """A source cannot be had here (a package that is not installed, or another version of it):
    the target it makes is reported unavailable and the fetch goes on with the rest."""


class TargetsUnavailable(DownloadFailed):
    """`fetch(strict=True)`: the sources of these targets could not be had (the rest were made).

    `reasons` maps each unavailable target to why, in one line."""

    def __init__(self, reasons: dict[str, str]) -> None:
        self.reasons = dict(reasons)
        super().__init__("; ".join(f"{t} unavailable: {why}" for t, why in reasons.items()))


class ConversionFailed(FetchError):
    """GGUF to safetensors conversion failed (missing `gguf`/`accelerate`, unknown architecture)."""

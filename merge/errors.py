"""The merge step's exception hierarchy.

Every error the user can cause is a `MergeError` whose message is written for the user and whose
`param` names the command-line argument at fault (the CLI prints both and exits non-zero, with no
traceback). Anything else escaping the pipeline is a bug.
"""

from __future__ import annotations

__all__ = [
    "MergeError",
    "InvalidConfig",
    "InputNotFound",
    "IncompatibleCheckpoints",
    "InvalidData",
    "OutputExists",
]


class MergeError(Exception):
    """Base class: a refusal or failure the user can act on."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message


class InvalidConfig(MergeError):
    """A setting is out of range or malformed (grid, tolerance, shard size, ...)."""


class InputNotFound(MergeError):
    """A checkpoint or data path does not exist (and is not a Hub id that could be fetched)."""


class IncompatibleCheckpoints(MergeError):
    """Base and aligned differ in architecture, tensor names or shapes, or tokenizer."""


class InvalidData(MergeError):
    """An evaluation split is missing, empty or has malformed items."""


class OutputExists(MergeError):
    """OUT already holds something and overwriting was not asked for."""

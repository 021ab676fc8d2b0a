"""The tune step's exception hierarchy.

Every error the user can cause is a `TuneError` whose message is written for the user and whose
`param` names the command-line argument at fault; `calibserve tune` prints both on one line and
exits with status 2, no traceback. Anything else escaping the trainer is a bug.
"""

from __future__ import annotations

__all__ = ["TuneError", "InvalidConfig", "InvalidData", "InputNotFound", "OutputExists",
           "ResumeMismatch"]


class TuneError(Exception):
    """Base class: a refusal or failure the user can act on."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message


class InvalidConfig(TuneError):
    """A setting is out of range, malformed, or not available in this build."""


class InvalidData(TuneError):
    """A training file is missing, empty, or has a malformed line."""


class InputNotFound(TuneError):
    """The checkpoint to tune does not exist or cannot be loaded."""


class OutputExists(TuneError):
    """OUT already holds a checkpoint and overwriting was not asked for."""


class ResumeMismatch(TuneError):
    """OUT.partial was left by a run with other arguments, data or checkpoint."""

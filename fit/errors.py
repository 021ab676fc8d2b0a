"""`ServeFitError`: what the serving-path fit refuses, with the option at fault."""

from __future__ import annotations

__all__ = [
    "ServeFitError",
]


class ServeFitError(RuntimeError):
    """The serving path did not give what the fit needs (a failed request, a raw that differs),
    or a method cannot be fitted on this checkpoint; `param` names the option at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

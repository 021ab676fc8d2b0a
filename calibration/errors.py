"""The exception hierarchy of `calibration`.

Everything this package raises on bad input derives from `CalibrationError`, itself a
`ValueError`, so callers that only care about "bad input" can catch `ValueError`:

- `CalibrationError(ValueError)`: invalid argument (unknown method, rule or norm, malformed
  logprobs, mismatched accumulators, unknown calibrator type).
  - `DegenerateDataError`: data a statistic cannot be computed or fitted on (empty, NaN, lengths
    that differ, all labels equal when fitting a calibrator).
  - `NoOptionTokensError`: the `answer` confidence found none of the option tokens among the first
    token's candidates; callers fall back to another method (free-form replies).
"""

from __future__ import annotations

__all__ = ["CalibrationError", "DegenerateDataError", "NoOptionTokensError"]


class CalibrationError(ValueError):
    """Base class of every error raised by `calibration` on invalid input."""


class DegenerateDataError(CalibrationError):
    """The data cannot support the requested statistic or fit (empty, NaN, one class, ...)."""


class NoOptionTokensError(CalibrationError):
    """None of the answer options appears among the first token's top logprobs."""

"""The built-in short-answer graders, by short name, and how a grader is named on a command line.

- `exact` (`answers.exact_match`, the default): the normalised reply equals the normalised gold
  or an alias;
- `contains` (`contains_answer`): the normalised gold or an alias is a whole-word run in the
  normalised first line of the reply. An instruction-tuned model answers in its own words
  ("Paris.", "The capital of France is Paris."), which exact match grades wrong.

Normalisation is `answers.normalize_answer` in both. Any other grader is named `module:function`
(a callable `(reply, gold, aliases) -> bool`, see `answers.Grader`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from calibserve.calibration.answers import Grader, exact_match, normalize_answer
from calibserve.calibration.errors import CalibrationError

__all__ = ["DEFAULT_GRADER", "GRADERS", "contains_answer", "load_grader"]


def contains_answer(reply: str, gold: str, aliases: Sequence[str] = ()) -> bool:
    """True if the normalised gold or an alias is a whole-word run in the reply's first line."""
    first = reply.strip().splitlines()[0] if reply.strip() else ""
    got = f" {normalize_answer(first)} "
    return any(
        (want := normalize_answer(g)) and f" {want} " in got for g in (gold, *aliases)
    )


GRADERS: dict[str, Grader] = {"exact": exact_match, "contains": contains_answer}
DEFAULT_GRADER = "exact"


def load_grader(spec: str | None) -> Grader:
    """A grader by short name (`exact`, `contains`) or `module:function`; None: `exact`.

    Raises `CalibrationError` (a ValueError) naming the valid short names when `spec` is
    neither, or when `module:function` does not name a callable."""
    if not spec:
        return GRADERS[DEFAULT_GRADER]
    if spec in GRADERS:
        return GRADERS[spec]
    module, _, name = spec.partition(":")
    if not module or not name:
        raise CalibrationError(
            f"unknown grader {spec!r}: use {' or '.join(GRADERS)}, or module:function")
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except ImportError as exc:
        raise CalibrationError(f"grader {spec!r}: cannot import {module!r} ({exc})") from None
    if not callable(fn):
        raise CalibrationError(f"grader {spec!r}: {name!r} is not a callable of {module!r}")
    grader: Grader = fn
    return grader

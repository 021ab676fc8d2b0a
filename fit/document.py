"""The calibration document the fit writes, and the ones its serving passes serve.

`with_free_form` / `with_no_letter` put a fit's entries and report into a document (validated;
NaN written as null: calibration.json is strict JSON); `serving_document` is a document serving
one method as `free_form` with no map of its own, so a pass reads that method's raw as served.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from calibserve.calibration import CalibrationDocument, MethodCalibration, MethodParams
from calibserve.calibration.methods import NO_LETTER
from calibserve.fit.free_form import FreeFormFit

__all__ = [
    "serving_document",
    "with_free_form",
    "with_no_letter",
]


def with_no_letter(doc: CalibrationDocument, entry: MethodCalibration, report: Mapping[str, Any]
                   ) -> CalibrationDocument:
    """`doc` with the `no_letter` entry and `metrics.no_letter` (validated)."""
    data = doc.to_dict()
    data["methods"][NO_LETTER] = entry.model_dump(mode="json")
    data["metrics"] = {**data.get("metrics", {}), NO_LETTER: dict(report)}
    return CalibrationDocument.from_dict(_finite(data))


def with_free_form(doc: CalibrationDocument, fit: FreeFormFit) -> CalibrationDocument:
    """`doc` with the free-form entries, `free_form` and `metrics.short_answer` (validated).
    A method's parameters already in `doc` (a verify question, consistency's k) are kept
    where the fit set none."""
    data = doc.to_dict()
    for method, entry in fit.methods.items():
        new = entry.model_dump(mode="json")
        old = (data["methods"].get(method) or {}).get("params") or {}
        new["params"] = {**old, **new.get("params", {})}
        data["methods"][method] = new
    data["free_form"] = fit.free_form
    data["metrics"] = {**data.get("metrics", {}),
                       "short_answer": {**fit.report, "notes": fit.notes}}
    out = CalibrationDocument.from_dict(_finite(data))
    return out if fit.no_letter is None else with_no_letter(out, *fit.no_letter)


def _finite(value: Any) -> Any:
    """NaN (an AUROC of one class) as null: calibration.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def serving_document(doc: CalibrationDocument, method: str, params: MethodParams | None,
                     path: Path) -> Path:
    """`doc` serving `method` as `free_form` with no map of its own (its raw is served)."""
    data = doc.to_dict()
    entry = dict(data["methods"].get(method) or {})
    old = entry.get("params") or {}
    new = params.model_dump(mode="json") if params is not None else {}
    data["methods"][method] = {"params": {**old, **new}}
    data["free_form"] = method
    return CalibrationDocument.from_dict(data).write(path)

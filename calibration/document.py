"""`calibration.json` as one typed document: one model, one loader, one writer.

merge writes it next to the checkpoint it picks (and `calibserve calibrate` for any other
checkpoint); the server's scorer and the routing policy read it. Version 2 (what is written) holds,
per confidence method, its own calibrator, thresholds and fit metrics, and names the method used
for option-letter replies (`multiple_choice`) and for every other reply (`free_form`):

    {"version": 2,
     "methods": {"answer": {"params": {"options": ["A", "B", "C", "D"], "temperature": 1.0},
                            "calibrator": {"type": "temperature", "temperature": 1.7},
                            "thresholds": [{"target_accuracy": 0.8, "threshold": 0.63,
                                            "coverage": 0.55, "accuracy": 0.81}],
                            "fit": {"n": 320, "ece_raw": 0.12, "ece_calibrated": 0.03}},
                 "mean": {"params": {}, "calibrator": null, "thresholds": [], "fit": null}},
     "multiple_choice": "answer", "free_form": "mean",
     "merge": {"lambda": 0.3, ...} | null, "metrics": {...}}

A method whose `calibrator` is null (or the identity) has no map of its own: its replies are served
with the raw confidence and `calibrated: false`. Version 1 files (one `confidence` block, one
`calibrator`) still load, converted to version 2: the v1 method keeps the calibrator, thresholds
and fit; the v1 `fallback` becomes `free_form` without a calibrator. The full schema is in
docs/internals.md. Errors are `CalibrationError`s naming the field (or the version) at fault.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from calibserve.calibration.calibrators import Calibrator, calibrator_from_dict
from calibserve.calibration.confidence import DEFAULT_OPTIONS
from calibserve.calibration.confidence import METHODS as TOKEN_STATISTICS
from calibserve.calibration.errors import CalibrationError
from calibserve.calibration.guarantee import MAX_STARTS, Certificate, batch_error_target
from calibserve.calibration.methods import (
    CONFIDENCE_METHODS as METHODS,
)
from calibserve.calibration.methods import (
    DEFAULT_CONSISTENCY_K,
    EXTRA_WORK_METHODS,
    FREE_FORM_METHODS,
    NO_LETTER,
)
from calibserve.publish import write_atomic

__all__ = [
    "CURRENT_VERSION",
    "FILE_NAME",
    "PROBES_FILE",
    "SUPPORTED_VERSIONS",
    "CalibrationDocument",
    "FitMetrics",
    "Guarantee",
    "MergeInfo",
    "MethodCalibration",
    "MethodParams",
    "Threshold",
]

FILE_NAME = "calibration.json"
# Beside calibration.json: the held-out items the server probes with (server/probes.py), written
# by merge and `calibserve calibrate` from the test split, never from the items fitted on.
PROBES_FILE = "probes.jsonl"
CURRENT_VERSION = 2
SUPPORTED_VERSIONS: tuple[int, ...] = (1, 2)
DEFAULT_QUANTILE = 0.1
# v1 knew the token statistics only (its `method` / `fallback`); v2 takes every registry method.
_V1_METHODS = tuple(m for m in TOKEN_STATISTICS if m != NO_LETTER)
_V1_FREE_FORM = tuple(m for m in TOKEN_STATISTICS if m in FREE_FORM_METHODS)


class _Model(BaseModel):
    """Strict (no string-to-number coercion), closed (unknown keys refused), immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)


class _Sparse(_Model):
    """Optional fields left unset (None) are not written."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


def _probability(value: float) -> float:
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"must be in [0, 1], got {value!r}")
    return value


class MethodParams(_Sparse):
    """A method's parameters: `options` and `temperature` (`answer`), `quantile` (`quantile`),
    `question` (`verify`: the yes/no question asked instead of the default), `verdict_token_ids`
    (`verify`: the tokenizer's yes and no token ids, `{"yes": [...], "no": [...]}`, recorded by
    the fit: the verdict request then asks vLLM for exactly those logprobs), `k` (`consistency`:
    samples per request, >= 2, default 5)."""

    options: list[str] | None = None
    temperature: float | None = None
    quantile: float | None = None
    question: str | None = None
    verdict_token_ids: dict[str, list[int]] | None = None
    k: int | None = None

    @field_validator("verdict_token_ids")
    @classmethod
    def _both_sides(cls, v: dict[str, list[int]] | None) -> dict[str, list[int]] | None:
        if v is None:
            return v
        if set(v) != {"yes", "no"} or not v["yes"] or not v["no"]:
            raise ValueError("needs non-empty 'yes' and 'no' lists of token ids")
        if any(i < 0 for ids in v.values() for i in ids):
            raise ValueError("token ids must be >= 0")
        return v

    @field_validator("question")
    @classmethod
    def _some_question(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("k")
    @classmethod
    def _samples(cls, v: int | None) -> int | None:
        if v is not None and v < 2:
            raise ValueError(f"must be an integer >= 2, got {v!r}")
        return v

    @field_validator("options")
    @classmethod
    def _some_options(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("needs at least one option")
        return v

    @field_validator("temperature")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"must be positive and finite, got {v!r}")
        return v

    @field_validator("quantile")
    @classmethod
    def _in_unit(cls, v: float | None) -> float | None:
        return None if v is None else _probability(v)


class Threshold(_Sparse):
    """Escalate below `threshold` (calibrated) to reach `target_accuracy` on the fit data;
    `coverage` is the fraction served at or above it, `accuracy` what they achieved."""

    target_accuracy: float
    threshold: float
    coverage: float
    accuracy: float | None = None

    @field_validator("target_accuracy", "threshold", "coverage", "accuracy")
    @classmethod
    def _in_unit(cls, v: float | None) -> float | None:
        return None if v is None else _probability(v)


class Guarantee(_Sparse):
    """A threshold certified by `calibration.guarantee.certify_threshold`: with probability at
    least 1 - `delta`, answers kept at or above `threshold` are wrong at most `max_error` of the
    time, on traffic exchangeable with the `n` items it was certified on. `kept` of them were
    kept (`coverage` = kept / n), `kept_errors` of those wrong, and `bound` is their exact
    (Clopper-Pearson) upper bound at 1 - delta. `batch` (a batch certificate): any one batch of
    at least `batch` kept answers is wrong at most `max_error` of the time with probability at
    least 1 - delta; the rate certified is then `batch_target` (`batch_error_target`), `bound`
    is at 1 - delta / 2 and at most it. `starts` (K > 1): certified by K fixed sequences at
    level / K each (`calibserve certify --starts K`), `bound` at that level; unset: one. `tier`
    and `tiers`: its place in a cascade (`calibserve certify`), where `n` counts the items the
    earlier tiers did not keep."""

    max_error: float
    delta: float
    threshold: float
    coverage: float
    bound: float
    n: int = Field(ge=1)
    kept: int = Field(ge=1)
    kept_errors: int = Field(ge=0)
    batch: int | None = Field(default=None, ge=1)
    batch_target: float | None = None
    starts: int | None = Field(default=None, ge=1, le=MAX_STARTS)
    tier: int | None = Field(default=None, ge=0)
    tiers: int | None = Field(default=None, ge=1)
    after: list[str] | None = None  # cascade: the earlier tiers, primary first

    @field_validator("max_error", "delta", "threshold", "coverage", "bound", "batch_target")
    @classmethod
    def _in_unit(cls, v: float | None) -> float | None:
        return v if v is None else _probability(v)

    @property
    def target(self) -> float:
        """The kept answers' error rate certified: `batch_target`, else max_error."""
        return self.max_error if self.batch_target is None else self.batch_target

    @model_validator(mode="after")
    def _consistent(self) -> Guarantee:
        if self.kept > self.n or self.kept_errors > self.kept:
            raise ValueError("needs kept_errors <= kept <= n")
        if (self.batch is None) != (self.batch_target is None):
            raise ValueError("batch and batch_target come together (a batch certificate)")
        if self.batch is not None and self.batch_target is not None:
            expected = batch_error_target(self.max_error, self.delta, self.batch)
            if abs(self.batch_target - expected) > 1e-9:
                raise ValueError(f"batch_target {self.batch_target} is not the batch target "
                                 f"{expected} of max_error {self.max_error}, delta "
                                 f"{self.delta}, batch {self.batch}")
        if self.bound > self.target + 1e-12:
            which = "max_error" if self.batch is None else "batch_target"
            raise ValueError(f"bound {self.bound} is above {which} {self.target}: "
                             "not a certificate")
        return self

    @classmethod
    def from_certificate(cls, cert: Certificate, **cascade: Any) -> Guarantee:
        """The document's record of a certified `Certificate` (ValueError when it is not)."""
        if not cert.certified or cert.bound is None:
            raise ValueError("nothing was certified: " + cert.refusal())
        return cls(max_error=cert.max_error, delta=cert.delta, threshold=cert.threshold,
                   coverage=cert.coverage, bound=cert.bound, n=cert.n, kept=cert.kept,
                   kept_errors=cert.kept_errors, batch=cert.batch,
                   batch_target=cert.batch_target,
                   starts=None if cert.starts == 1 else cert.starts, **cascade)


class FitMetrics(_Sparse):
    """How the method's calibrator did on the data it was fitted on."""

    n: int = Field(ge=0)
    ece_raw: float
    ece_calibrated: float
    accuracy: float | None = None
    # Right vs wrong ranked by the raw confidence (None: one class only, nothing to rank).
    auroc: float | None = None
    unreachable_targets: list[float] | None = None  # targets no threshold reaches
    calibrator: str | None = None  # the family fitted (`auto`: the one chosen)
    held_out_ece: dict[str, float] | None = None  # every candidate family's held-out ECE
    # Every candidate's held-out log loss, Brier, ECE and AUROC (and why `auto` refused it).
    held_out: dict[str, dict[str, float | str | None]] | None = None
    selection: str | None = None  # how the family was chosen (folds, seed)
    notes: list[str] | None = None  # what the fit had to say (degenerate data, skipped items)
    # 101 quantiles (0%, 1%, ..., 100%) of the served (calibrated) confidence on the fit split:
    # the reference the server's label-free drift signal compares served traffic against.
    confidence_quantiles: list[float] | None = None
    # What the map was fitted against: "gold" (the data's answers) or "none" (label-free: DACA,
    # calibration/label_free.py, against a reference model's option distribution; `ece_raw`,
    # `ece_calibrated` are then measured against the reference's probability of the answered
    # option, not against answers, and `accuracy` is unknown). Absent: a labelled fit written
    # before the field existed.
    labels: Literal["gold", "none"] | None = None
    reference: str | None = None  # label-free: the reference (base) model
    agreement: float | None = None  # label-free: share of items where both pick the same option
    n_agree: int | None = Field(default=None, ge=0)  # label-free: the items fitted on

    @property
    def label_free(self) -> bool:
        """Was the map fitted without labels?"""
        return self.labels == "none"

    @field_validator("agreement")
    @classmethod
    def _share(cls, v: float | None) -> float | None:
        return None if v is None else _probability(v)

    @field_validator("confidence_quantiles")
    @classmethod
    def _sorted_probabilities(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) < 2 or any(not 0.0 <= q <= 1.0 for q in v)
                              or any(a > b for a, b in zip(v, v[1:], strict=False))):
            raise ValueError("must be at least 2 ascending numbers in [0, 1]")
        return v


class MethodCalibration(_Model):
    """One confidence method: its parameters, its own calibrator (None: none), thresholds, fit."""

    params: MethodParams = MethodParams()
    calibrator: dict[str, Any] | None = None
    thresholds: list[Threshold] = []
    # Certified thresholds (`--threshold guaranteed`), one per max_error; written only when any.
    guarantees: list[Guarantee] = []
    fit: FitMetrics | None = None

    @model_serializer(mode="wrap")
    def _drop_no_guarantees(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if not data.get("guarantees"):
            data.pop("guarantees", None)
        return data

    def guarantee_for(self, max_error: float | None = None) -> Guarantee | None:
        """The certificate for `max_error`: exactly it, else the one with the largest
        max_error below it (stricter: more escalation); None: the strictest on record."""
        entries = sorted(self.guarantees, key=lambda g: g.max_error)
        if max_error is None:
            return entries[0] if entries else None
        fitting = [g for g in entries if g.max_error <= max_error + 1e-9]
        return fitting[-1] if fitting else None

    @field_validator("calibrator")
    @classmethod
    def _known_calibrator(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            calibrator_from_dict(v)  # CalibrationError is a ValueError: reported with the field
        return v

    @property
    def calibrated(self) -> bool:
        """Does this method have a map of its own? The identity is no map, unless the method's
        fitted multi-class temperature (`params.temperature` != 1) is the map it sits on."""
        if self.calibrator is None:
            return False
        if self.calibrator.get("type") != "identity":
            return True
        t = self.params.temperature
        return t is not None and t != 1.0

    @property
    def label_free(self) -> bool:
        """Was this method's map fitted without labels (`fit.labels` "none")?"""
        return self.fit is not None and self.fit.label_free

    def calibration_map(self) -> Calibrator | None:
        """The fitted calibrator, or None when the method has no map of its own."""
        if self.calibrator is None or not self.calibrated:
            return None
        return calibrator_from_dict(self.calibrator)


class MergeInfo(_Model):
    """Which merge produced the model (`lambda` is the interpolation weight)."""

    lambda_: float = Field(alias="lambda")
    method: str
    base: str
    aligned: str
    rule: str

    @model_serializer(mode="wrap")
    def _aliased(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if "lambda_" in data:  # written under its JSON name even without by_alias
            data = {"lambda" if k == "lambda_" else k: v for k, v in data.items()}
        return data


class CalibrationDocument(_Model):
    """`calibration.json`, version 2. Build with `load`, `from_dict` or the constructor."""

    version: Literal[2] = 2
    methods: dict[str, MethodCalibration]
    multiple_choice: str
    free_form: str
    merge: MergeInfo | None = None
    metrics: dict[str, Any] = {}

    @model_validator(mode="after")
    def _consistent(self) -> CalibrationDocument:
        # Document-wide checks: the message starts with the dotted field it is about.
        for name, entry in self.methods.items():
            if name not in METHODS:
                raise ValueError(f"methods.{name}: unknown method; valid: {', '.join(METHODS)}")
            p = entry.params
            if name != "answer" and (p.options is not None or p.temperature is not None):
                raise ValueError(f"methods.{name}.params: options and temperature are "
                                 "`answer` parameters")
            if name != "quantile" and p.quantile is not None:
                raise ValueError(f"methods.{name}.params: quantile is a `quantile` parameter")
            if name != "verify" and (p.question is not None or p.verdict_token_ids is not None):
                raise ValueError(f"methods.{name}.params: question and verdict_token_ids are "
                                 "`verify` parameters")
            if name != "consistency" and p.k is not None:
                raise ValueError(f"methods.{name}.params: k is a `consistency` parameter")
        for role in ("multiple_choice", "free_form"):
            name = getattr(self, role)
            if name not in self.methods:
                raise ValueError(
                    f"{role}: {name!r} is not one of the document's methods "
                    f"({', '.join(self.methods) or 'none'})"
                )
        if self.multiple_choice == NO_LETTER:
            raise ValueError(f"multiple_choice: {NO_LETTER!r} scores only the replies the "
                             "multiple-choice method finds no option letter in")
        if self.multiple_choice in EXTRA_WORK_METHODS:
            raise ValueError(
                f"multiple_choice: {self.multiple_choice!r} needs extra upstream work and is "
                "tried on every reply; name it as `free_form` instead"
            )
        if self.free_form not in FREE_FORM_METHODS:
            raise ValueError(
                f"free_form: {self.free_form!r} cannot score a reply without option letters; "
                f"valid: {', '.join(FREE_FORM_METHODS)}"
            )
        return self

    # --- reading ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationDocument:
        """Validate a parsed `calibration.json` of any supported version (v1 is converted)."""
        if not isinstance(data, Mapping):
            raise CalibrationError("calibration.json must be a JSON object")
        version = data.get("version", 1)  # v1 files may predate the field
        if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
            raise CalibrationError(
                f"unsupported calibration.json version {version!r}; supported versions: "
                + ", ".join(str(v) for v in SUPPORTED_VERSIONS)
            )
        try:
            if version == 1:
                return _V1Document.model_validate(dict(data)).to_current()
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise CalibrationError(_describe(exc, version)) from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationDocument:
        """Read `path` (a `calibration.json`, or a model directory holding one). A missing,
        unreadable or invalid file is a `CalibrationError` naming it."""
        file = Path(path)
        if file.is_dir():
            file = file / FILE_NAME
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{file}: not valid JSON ({exc})") from None
        except OSError as exc:
            raise CalibrationError(f"{file}: cannot read it ({exc.strerror or exc})") from None
        try:
            return cls.from_dict(data)
        except CalibrationError as exc:
            raise CalibrationError(f"{file}: {exc}") from None

    # --- writing ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, version 2 (what `write` writes)."""
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True)
        return data

    def to_json(self) -> str:
        """The file's text: indented JSON, one trailing newline."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (`calibserve.publish.write_atomic`) to `path`: a file, or a directory
        to put `calibration.json` in."""
        file = Path(path)
        if file.is_dir():
            file = file / FILE_NAME
        write_atomic(file, self.to_json())
        return file

    # --- using -----------------------------------------------------------------------------

    def method(self, name: str | None = None) -> MethodCalibration:
        """A method's entry (default: the multiple-choice method)."""
        key = self.multiple_choice if name is None else name
        try:
            return self.methods[key]
        except KeyError:
            raise CalibrationError(
                f"calibration.json has no method {key!r} (methods: {', '.join(self.methods)})"
            ) from None

    def options(self) -> tuple[str, ...]:
        """Option letters of the `answer` method (the default letters without one)."""
        entry = self.methods.get("answer")
        opts = entry.params.options if entry is not None else None
        return tuple(opts) if opts is not None else DEFAULT_OPTIONS

    def temperature(self) -> float:
        """Softmax temperature of the `answer` method (1.0 without one)."""
        entry = self.methods.get("answer")
        t = entry.params.temperature if entry is not None else None
        return 1.0 if t is None else t

    def quantile(self) -> float:
        """`q` of the `quantile` method (0.1 without one)."""
        entry = self.methods.get("quantile")
        q = entry.params.quantile if entry is not None else None
        return DEFAULT_QUANTILE if q is None else q

    def verify_question(self) -> str | None:
        """The `verify` method's question override (None: calibration.verify's default)."""
        entry = self.methods.get("verify")
        return entry.params.question if entry is not None else None

    def verdict_token_ids(self) -> tuple[int, ...]:
        """The `verify` method's yes and no token ids (empty: unknown, read the top 20)."""
        entry = self.methods.get("verify")
        ids = entry.params.verdict_token_ids if entry is not None else None
        return () if ids is None else tuple(dict.fromkeys([*ids["yes"], *ids["no"]]))

    def consistency_k(self) -> int:
        """Samples per request of the `consistency` method (5 without one)."""
        entry = self.methods.get("consistency")
        k = entry.params.k if entry is not None else None
        return DEFAULT_CONSISTENCY_K if k is None else k


# --- version 1 ---------------------------------------------------------------------------------


class _V1Confidence(_Model):
    method: str = "mean"
    options: list[str] | None = None
    temperature: float = 1.0
    fallback: str = "mean"
    quantile: float | None = None
    q: float | None = None  # an early spelling of `quantile`

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in _V1_METHODS:
            raise ValueError(f"unknown method {v!r}; valid: {', '.join(_V1_METHODS)}")
        return v

    @field_validator("fallback")
    @classmethod
    def _free_form(cls, v: str) -> str:
        if v not in _V1_FREE_FORM:
            raise ValueError(f"must be one of {', '.join(_V1_FREE_FORM)}, got {v!r}")
        return v

    @field_validator("temperature")
    @classmethod
    def _positive(cls, v: float) -> float:
        # v1 checked the temperature whatever the method; so does its reader.
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"must be positive and finite, got {v!r}")
        return v

    def params(self, method: str) -> MethodParams:
        if method == "answer":
            return MethodParams(
                options=list(self.options) if self.options else list(DEFAULT_OPTIONS),
                temperature=self.temperature,
            )
        if method == "quantile":
            q = self.quantile if self.quantile is not None else self.q
            return MethodParams(quantile=DEFAULT_QUANTILE if q is None else q)
        return MethodParams()


class _V1Document(_Model):
    version: Literal[1] = 1
    confidence: _V1Confidence | None = None
    calibrator: dict[str, Any] | None = None
    thresholds: list[Threshold] | None = None
    merge: MergeInfo | None = None
    metrics: dict[str, Any] | None = None

    @field_validator("calibrator")
    @classmethod
    def _known_calibrator(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v:  # v1 treated {} as no calibrator
            calibrator_from_dict(v)
        return v

    def to_current(self) -> CalibrationDocument:
        conf = self.confidence if self.confidence is not None else _V1Confidence()
        metrics = dict(self.metrics or {})
        fit_data = metrics.pop("calibrate", None)
        fit = _fit_from_v1(fit_data) if fit_data is not None else None
        methods = {
            conf.method: MethodCalibration(
                params=conf.params(conf.method),
                # v1 treated {} (and the identity) as no calibrator.
                calibrator=None if _no_map(self.calibrator) else self.calibrator,
                thresholds=list(self.thresholds or []),
                fit=fit,
            )
        }
        if conf.fallback != conf.method:
            # The v1 calibrator was fitted on the v1 method's scores: the fallback has no map.
            methods[conf.fallback] = MethodCalibration(params=conf.params(conf.fallback))
        return CalibrationDocument(
            methods=methods,
            multiple_choice=conf.method,
            free_form=conf.fallback,
            merge=self.merge,
            metrics=metrics,
        )


def _no_map(calibrator: dict[str, Any] | None) -> bool:
    return not calibrator or calibrator.get("type") == "identity"


def _fit_from_v1(data: Any) -> FitMetrics:
    try:
        return FitMetrics.model_validate(data)
    except ValidationError as exc:
        raise CalibrationError(_describe(exc, 1, prefix="metrics.calibrate")) from None


def _describe(exc: ValidationError, version: int, prefix: str = "") -> str:
    """`calibration.json (version N): FIELD: problem; ...` from a pydantic error."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *err["loc"]))
        msg = re.sub(r" or instance of _?\w+$", "", str(err["msg"]).removeprefix("Value error, "))
        problems.append(f"{loc}: {msg}" if loc else msg)  # document-wide checks name the field
    return f"malformed calibration.json (version {version}): " + "; ".join(problems)

"""`MergeConfig`: every setting of one merge run, typed and validated (the CLI builds one).

Validation happens here, before anything is read or written, so a bad setting is refused with the
name of the argument at fault and nothing on disk changes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from calibserve.calibration import DEFAULT_TARGET_ACCURACIES, N_BINS, RULES
from calibserve.calibration.errors import CalibrationError
from calibserve.calibration.grading import DEFAULT_GRADER, load_grader
from calibserve.calibration.guarantee import DEFAULT_DELTA
from calibserve.merge.errors import InvalidConfig

__all__ = [
    "MergeConfig",
    "DEFAULT_GRID",
    "parse_grid",
    "parse_size",
    "build_config",
    "SELECT_RULES",
    "OBJECTIVES",
    "EVALUATORS",
    "parse_select",
]

DEFAULT_GRID: tuple[float, ...] = tuple(round(i / 10, 6) for i in range(11))
# Extrapolating far past either parent is almost surely a typo ("0:10:1" for "0:1:0.1").
GRID_LIMITS = (-1.0, 3.0)
MAX_GRID_POINTS = 201
SELECT_RULES: tuple[str, ...] = tuple(RULES)
# What a rule is applied to (`--select OBJECTIVE:RULE`): the multiple-choice (accuracy, ECE)
# of the option-letter confidence, the short answers' (accuracy, ECE) of the free-form
# confidence, or their mean (each kind weighted one half, whatever its number of items).
OBJECTIVES: tuple[str, ...] = ("multiple-choice", "free-form", "combined")
Objective = Literal["multiple-choice", "free-form", "combined"]
MAX_NEW_TOKENS = 256
DEVICE_PATTERN = r"cpu|cuda(:\d+)?|mps"  # what --device accepts (merge, certify)

# Map pydantic field names to the CLI flags users typed, for error messages.
FLAG_NAMES: dict[str, str] = {
    "base": "--base",
    "aligned": "--aligned",
    "data": "--data",
    "out": "--out",
    "grid": "--grid",
    "method": "--method",
    "select": "--select",
    "tolerance": "--tolerance",
    "calibrator": "--calibrator",
    "diversity": "--diversity",
    "refine": "--refine",
    "device": "--device",
    "dtype": "--dtype",
    "batch_size": "--batch-size",
    "shard_size": "--shard-size",
    "target_accuracy": "--target-accuracy",
    "max_error": "--max-error",
    "delta": "--delta",
    "batch": "--batch",
    "n_bins": "--bins",
    "max_items": "--max-items",
    "overwrite": "--overwrite",
    "seed": "--seed",
    "objective": "--select",
    "grader": "--grader",
    "max_new_tokens": "--max-new-tokens",
    "short_answers": "--short-answers",
    "label_free": "--label-free",
    "evaluator": "--evaluator",
    "tensor_parallel_size": "--tensor-parallel-size",
    "pipeline_parallel_size": "--pipeline-parallel-size",
    "distributed_executor_backend": "--distributed-executor-backend",
    "gpu_memory_utilization": "--gpu-memory-utilization",
}
# What scores the sweep: the engine that serves (vllm) or transformers in-process (the reference).
EVALUATORS: tuple[str, ...] = ("transformers", "vllm")


def parse_select(spec: str) -> tuple[str, str]:
    """(objective, rule) from `RULE`, `OBJECTIVE:RULE` or `OBJECTIVE` (rule max-accuracy)."""
    text = spec.strip()
    objective, sep, rule = text.partition(":")
    if not sep:
        objective, rule = ("multiple-choice", text) if text not in OBJECTIVES else (
            text, "max-accuracy")
    if objective not in OBJECTIVES:
        raise InvalidConfig(f"unknown objective {objective!r} in {spec!r}; choose one of "
                            f"{', '.join(OBJECTIVES)}", "--select")
    if rule not in SELECT_RULES:
        raise InvalidConfig(f"unknown rule {rule!r}; choose one of {', '.join(SELECT_RULES)}",
                            "--select")
    return objective, rule


def _clean_lambda(value: float) -> float:
    # Rounding makes "0:1:0.1" yield 0.3, not 0.30000000000000004, so cache keys and reports agree.
    return round(float(value), 6) + 0.0


def parse_grid(spec: str | list[float] | tuple[float, ...]) -> list[float]:
    """A grid from "0,0.25,0.5", "start:stop:step" (stop included), or a mix: "0:1:0.1,1.2"."""
    values: list[float] = []
    if isinstance(spec, list | tuple):
        values = [float(v) for v in spec]
    else:
        text = spec.strip()
        if not text:
            raise InvalidConfig("the grid is empty", "--grid")
        for part in re.split(r"[,\s]+", text):
            if not part:
                continue
            try:
                if ":" in part:
                    fields = [float(x) for x in part.split(":")]
                    if len(fields) != 3:
                        raise ValueError
                    start, stop, step = fields
                    if step <= 0 or stop < start:
                        raise InvalidConfig(
                            f"range {part!r} needs start <= stop and a positive step", "--grid"
                        )
                    n = int(math.floor((stop - start) / step + 1e-9)) + 1
                    if n > MAX_GRID_POINTS:
                        raise InvalidConfig(
                            f"range {part!r} has {n} points (max {MAX_GRID_POINTS})", "--grid"
                        )
                    values += [start + i * step for i in range(n)]
                else:
                    values.append(float(part))
            except ValueError as exc:
                raise InvalidConfig(
                    f"cannot parse {part!r}: use a list like 0,0.5,1 or a range start:stop:step",
                    "--grid",
                ) from exc
    lo, hi = GRID_LIMITS
    for v in values:
        if not math.isfinite(v) or not lo <= v <= hi:
            raise InvalidConfig(f"lambda {v!r} is outside [{lo}, {hi}]", "--grid")
    out = sorted({_clean_lambda(v) for v in values})
    if not out:
        raise InvalidConfig("the grid is empty", "--grid")
    if len(out) > MAX_GRID_POINTS:
        raise InvalidConfig(f"{len(out)} grid points (max {MAX_GRID_POINTS})", "--grid")
    return out


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(spec: str | int) -> int:
    """Bytes from 5GB, 500MB, 2GiB or a plain integer."""
    if isinstance(spec, int):
        size = spec
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", spec)
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise InvalidConfig(f"cannot parse size {spec!r} (e.g. 2GB, 500MB)", "--shard-size")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if size < 1024:
        raise InvalidConfig(f"shard size {spec!r} is below 1 KB", "--shard-size")
    return size


class MergeConfig(BaseModel):
    """One merge run. `base`/`aligned` are local directories or Hugging Face Hub ids."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(min_length=1)
    aligned: str = Field(min_length=1)
    data: Path
    out: Path
    grid: list[float] = Field(default_factory=lambda: list(DEFAULT_GRID))
    method: Literal["linear", "slerp"] = "linear"
    select: str = "max-accuracy"
    # What `select` is applied to (also given as `select="free-form:knee"`).
    objective: Objective = "multiple-choice"
    tolerance: float = Field(default=0.01, ge=0.0, le=1.0)
    # auto: the family with the lowest held-out log loss (calibration.choose_calibrator)
    calibrator: Literal["auto", "identity", "temperature", "option_temperature", "platt",
                        "histogram", "isotonic"] = "auto"
    diversity: bool = False
    refine: bool = True
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(default=32, ge=1, le=4096)
    shard_size: int = Field(default=2 * 10**9, ge=1024)
    target_accuracy: list[float] = Field(default_factory=lambda: list(DEFAULT_TARGET_ACCURACIES))
    # Certified thresholds of the option-letter method (calibration/certified.py).
    max_error: list[float] = Field(default_factory=list)
    delta: float = Field(default=DEFAULT_DELTA, gt=0.0, lt=1.0)
    # With max_error: certify every batch of at least this many kept answers, not only the rate.
    batch: int | None = Field(default=None, ge=1)
    n_bins: int = Field(default=N_BINS, ge=2, le=1000)
    max_items: int | None = Field(default=None, ge=1)
    overwrite: bool = False
    seed: int = 0
    # Short answers of the data (select and test splits): generated and graded at each point.
    short_answers: bool = True
    grader: str = DEFAULT_GRADER  # `exact`, `contains` or module:function
    max_new_tokens: int = Field(default=16, ge=1, le=MAX_NEW_TOKENS)
    # The option-letter map fitted with no labels: DACA against the base at the chosen lambda
    # (merge/calibrate.py `fit_label_free`); the calibrate split's answers are not read.
    label_free: bool = False
    # Who computes the sweep's logprobs (merge/backends.py); the engine's parallelism and the
    # fraction of device memory it may take (on CPU vLLM sizes its KV cache by
    # VLLM_CPU_KVCACHE_SPACE instead, merge/engine.py).
    evaluator: Literal["transformers", "vllm"] = "transformers"
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    # Several nodes, as vLLM does it: pipeline stages (one per node, tensor parallelism within
    # a node) over a Ray cluster (`distributed_executor_backend="ray"`); None leaves vLLM's
    # choice (multiprocessing on one node).
    pipeline_parallel_size: int = Field(default=1, ge=1, le=64)
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    # None: 0.9 on a GPU, 0.3 on CPU (there it is a fraction of host RAM checked against free
    # memory at start, which 0.9 fails on a shared machine).
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _evaluator_options(self) -> MergeConfig:
        if self.evaluator == "transformers" and self.tensor_parallel_size != 1:
            raise InvalidConfig("tensor parallelism needs the vLLM evaluator (--evaluator "
                                "vllm); the transformers evaluator runs on one device",
                                "--tensor-parallel-size")
        if self.evaluator == "transformers" and self.pipeline_parallel_size != 1:
            raise InvalidConfig("pipeline parallelism needs the vLLM evaluator (--evaluator "
                                "vllm); the transformers evaluator runs on one device",
                                "--pipeline-parallel-size")
        if self.evaluator == "transformers" and self.distributed_executor_backend:
            raise InvalidConfig("an executor backend is the vLLM evaluator's (--evaluator "
                                "vllm); the transformers evaluator runs in this process",
                                "--distributed-executor-backend")
        return self

    @model_validator(mode="after")
    def _batch_needs_max_error(self) -> MergeConfig:
        if self.batch is not None and not self.max_error:
            raise InvalidConfig("only with --max-error (it certifies batches of the kept "
                                "answers)", "--batch")
        return self

    @model_validator(mode="after")
    def _label_free_family(self) -> MergeConfig:
        if self.label_free and self.calibrator not in ("auto", "option_temperature"):
            raise InvalidConfig(f"--label-free fits the option temperature only, not "
                                f"{self.calibrator}", "--calibrator")
        return self

    @model_validator(mode="before")
    @classmethod
    def _objective_in_select(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("select"), str):
            objective, rule = parse_select(data["select"])
            given = data.get("objective")
            if ":" in data["select"] or data["select"].strip() in OBJECTIVES:
                if given is not None and given != objective:
                    raise InvalidConfig(f"--select says {objective!r}, objective says "
                                        f"{given!r}", "--select")
                data = {**data, "select": rule, "objective": objective}
        return data

    @field_validator("grader")
    @classmethod
    def _grader(cls, v: str) -> str:
        try:
            load_grader(v)
        except CalibrationError as exc:
            raise InvalidConfig(str(exc), "--grader") from None
        return v

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, v: object) -> list[float]:
        if isinstance(v, str | list | tuple):
            return parse_grid(v)
        raise ValueError("grid must be a list of numbers or a string")

    @field_validator("shard_size", mode="before")
    @classmethod
    def _shard(cls, v: object) -> int:
        if isinstance(v, str | int) and not isinstance(v, bool):
            return parse_size(v)
        raise ValueError("shard size must be an integer or a string like 2GB")

    @field_validator("select")
    @classmethod
    def _select(cls, v: str) -> str:
        if v not in SELECT_RULES:
            raise ValueError(f"unknown rule {v!r}; choose one of {', '.join(SELECT_RULES)}")
        return v

    @property
    def selection(self) -> str:
        """The selection as `--select` spells it: the rule, prefixed by a non-default objective."""
        return self.select if self.objective == "multiple-choice" else \
            f"{self.objective}:{self.select}"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, v):
            raise ValueError(f"unknown device {v!r}; use cpu, cuda, cuda:N or mps")
        return v

    @field_validator("target_accuracy")
    @classmethod
    def _targets(cls, v: list[float]) -> list[float]:
        for t in v:
            if not 0.0 < t < 1.0:
                raise ValueError(f"target accuracy {t!r} must be strictly between 0 and 1")
        return sorted(set(v))

    @field_validator("max_error")
    @classmethod
    def _max_errors(cls, v: list[float]) -> list[float]:
        for a in v:
            if not 0.0 < a < 1.0:
                raise ValueError(f"max error {a!r} must be strictly between 0 and 1")
        return sorted(set(v))


def build_config(**kwargs: object) -> MergeConfig:
    """`MergeConfig(**kwargs)`, with pydantic's errors turned into `InvalidConfig(param=flag)`."""
    try:
        return MergeConfig.model_validate(kwargs)
    except InvalidConfig:
        raise
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else ""
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, InvalidConfig):
            raise InvalidConfig(cause.message, cause.param or FLAG_NAMES.get(field)) from None
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        raise InvalidConfig(msg, FLAG_NAMES.get(field, field or None)) from None

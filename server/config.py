"""Typed server configuration: what `calibserve serve` flags and the YAML config both produce.

The CLI's short form (`--model DIR`, `--upstream URL`, `--escalate-to ...`) is turned into the same
`ServerSettings` a YAML file describes, so there is one code path from configuration to runtime.

YAML example::

    port: 8000
    api_keys: [sk-local]
    models:
      - name: merged
        model: out/model              # a managed vLLM engine for this checkpoint
        # upstreams: [http://vllm-0:8000, http://vllm-1:8000]   # or external vLLM replicas
        escalate_to:
          - name: expert
            upstreams: [https://api.example.com]
            upstream_model: big-model
            api_key_env: EXPERT_API_KEY
        policy: threshold
        threshold: auto
        target_accuracy: 0.8
        stream_mode: buffer
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from calibserve.calibration.document import PROBES_FILE

DEFAULT_PORT = 8000


class EngineSettings(BaseModel):
    """How a managed vLLM engine is started (CPU or GPU defaults are filled in at start time)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0: pick a free port")
    dtype: str | None = Field(None, description="default: float32 on CPU, auto on GPU")
    max_model_len: int | None = Field(None, ge=16, description="default: 256 on CPU")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    max_logprobs: int = Field(20, ge=1)
    kvcache_space_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    cpu_worker_in_engine_core: bool = Field(
        True,
        description="CPU: vLLM's model worker runs inside its engine-core process "
        "(VLLM_ENABLE_V1_MULTIPROCESSING=0), not as a process of its own that the engine core "
        "busy-polls, taking the cores calibserve needs (docs/operations.md, 'A CPU engine')",
    )
    block_size: int | None = Field(
        None, ge=1,
        description="vLLM's KV-cache block size (its prefix cache reuses whole blocks only). "
        "Default: on CPU 32 when the tier serves `verify` (its prompt then reuses the reply's "
        "cached blocks: docs/operations.md), else vLLM's own (128 on CPU, which needs multiples "
        "of 32; 16 on GPU); `--block-size` in extra_args wins",
    )
    access_log: bool = Field(
        False,
        description="vLLM's uvicorn access log, one line per request in calibserve's log "
        "(calibserve counts every request in its own metrics); off by default "
        "(--disable-uvicorn-access-log)",
    )
    console: bool = Field(
        False,
        description="relay vLLM's output to calibserve's console too, as `[engine NAME]` lines "
        "(`calibserve serve --engine-console`); by default it goes to its log file only",
    )
    log_dir: Path | None = Field(
        None,
        description="directory of its log file, engine-NAME.log (`--engine-log-dir`; default: "
        "this run's directory, $CALIBSERVE_HOME/runs/<UTC time>-<pid>)",
    )
    extra_args: list[str] = Field(default_factory=list)
    start_timeout_s: float = Field(600.0, gt=0)
    restart_backoff_s: float = Field(1.0, gt=0, description="first restart delay; doubles")
    restart_backoff_max_s: float = Field(30.0, gt=0)
    python: str | None = Field(None, description="interpreter for vLLM; default: this one")


class TierSettings(BaseModel):
    """One model that can answer: a managed checkpoint or one or more OpenAI-compatible URLs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="name used in metrics and `served_by`")
    model: Path | None = Field(None, description="checkpoint directory: start a managed vLLM")
    upstreams: list[str] = Field(default_factory=list, description="replica base URLs")
    upstream_model: str | None = Field(
        None, description="model name the upstream expects (default: discovered or `name`)"
    )
    api_key: str | None = None
    api_key_env: str | None = Field(None, description="read the upstream API key from this env")
    calibration: Path | None = Field(
        None, description="calibration.json (default: MODEL/calibration.json if present)"
    )
    timeout_s: float = Field(600.0, gt=0)
    engine: EngineSettings = Field(default_factory=EngineSettings)

    @field_validator("upstreams", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [u.strip().rstrip("/") for v in value for u in str(v).split(",") if u.strip()]
        return value

    @model_validator(mode="after")
    def _one_source(self) -> TierSettings:
        if (self.model is None) == (not self.upstreams):
            raise ValueError(f"tier {self.name!r}: give exactly one of `model` or `upstreams`")
        return self

    @property
    def managed(self) -> bool:
        return self.model is not None

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None

    def calibration_path(self) -> Path | None:
        if self.calibration is not None:
            return self.calibration
        if self.model is not None and (self.model / "calibration.json").is_file():
            return self.model / "calibration.json"
        return None


class ModelSettings(TierSettings):
    """A model clients ask for by `name`: its primary tier plus optional escalation tiers."""

    escalate_to: list[TierSettings] = Field(default_factory=list)
    policy: Literal["never", "threshold", "budget"] | None = Field(
        None, description="default: threshold when escalate_to is set, else never"
    )
    threshold: float | Literal["auto", "guaranteed"] | None = Field(
        None, description="escalate below this calibrated confidence; auto: from calibration.json "
        "for target_accuracy; guaranteed: the certified threshold for max_error"
    )
    target_accuracy: float | None = Field(None, gt=0, le=1)
    max_error: float | None = Field(
        None, gt=0, lt=1, description="with threshold guaranteed: the certified error rate of "
        "kept answers to serve (calibration.json's certificate for it, else a stricter one)")
    uncalibrated: Literal["threshold", "escalate", "serve"] = Field(
        "threshold",
        description="threshold policy on a confidence with no calibrator of its own: threshold "
        "(the scoring method's threshold, else the free-form method's, else serve), escalate, "
        "serve",
    )
    budget: float | None = Field(None, ge=0, le=1, description="target escalation rate (budget)")
    stream_mode: str | None = Field(None, description="buffer | prefix:N | off (routing default)")
    probe_data: Path | None = Field(
        None, description="calibration probes, eval JSONL (default: probes.jsonl next to the "
        "calibration.json, the held-out split merge / calibserve calibrate write)")

    def probe_path(self) -> Path | None:
        """The probe file: `probe_data`, else probes.jsonl beside calibration.json if there."""
        if self.probe_data is not None:
            return self.probe_data
        cal = self.calibration_path()
        if cal is not None and (cal.parent / PROBES_FILE).is_file():
            return cal.parent / PROBES_FILE
        return None

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("auto", "guaranteed"):
            return float(value)
        return value

    @model_validator(mode="after")
    def _max_error_is_guaranteed(self) -> ModelSettings:
        if self.max_error is not None and self.threshold != "guaranteed":
            raise ValueError("max_error is for threshold: guaranteed")
        return self

    def resolved_policy(self) -> str:
        if self.policy is not None:
            return self.policy
        return "threshold" if self.escalate_to else "never"


class ServerSettings(BaseModel):
    """Everything `create_app` needs; built by the CLI or loaded from YAML."""

    model_config = ConfigDict(extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    models: list[ModelSettings] = Field(default_factory=list)
    api_keys: list[str] = Field(default_factory=list, description="bearer keys for /v1/*")
    feedback_keys: list[str] = Field(
        default_factory=list, description="bearer keys for /v1/feedback (default: api_keys)"
    )
    signing_key: str | None = Field(
        None, description="HMAC key for response ids (env CALIBSERVE_SIGNING_KEY; else random)"
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_n: int = Field(16, ge=1, description="largest `n` accepted (vLLM would accept more)")
    feedback_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)
    feedback_memory: int = Field(200_000, ge=1, description="ids remembered to answer 409")
    drain_timeout_s: float = Field(30.0, ge=0)
    # Slow and idle clients (server/connections.py).
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request line and headers must arrive within this (from the "
        "connect, or a later request's first byte); else 408 and close")
    body_timeout_s: float = Field(
        30.0, gt=0, description="most seconds between two reads of a request body; else 408 "
        "and close")
    keep_alive_timeout_s: float = Field(
        15.0, gt=0, description="an idle keep-alive connection is closed after this (above the "
        "openai SDK's 5 s pool expiry, so the client closes first; behind a load balancer, "
        "above its idle timeout)")
    write_timeout_s: float = Field(
        30.0, gt=0, description="most seconds a response write may wait on a reader that "
        "stopped reading; then the connection is aborted (slow readers that keep reading are "
        "not affected)")
    max_connections: int | None = Field(
        None, ge=1, description="open connections per process; more get a fast 503 (default: "
        "the open-file limit less 256, at most 10,000)")
    probe_rate: float = Field(0.0, ge=0, le=6000, description="calibration probes per minute "
                              "per model (0: off)")
    recalibrate: Literal["off", "shadow", "on"] = Field(
        "off", description="online recalibration from probes and feedback (server/"
        "recalibration.py): shadow exports the candidate's ECE, on swaps a better map in")
    recalibration_dir: Path | None = Field(
        None, description="where swapped calibrators are persisted (shared by replicas)")
    log_level: str = "info"

    @field_validator("api_keys", "feedback_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [k.strip() for v in value for k in str(v).split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> ServerSettings:
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError(f"model names must be unique, got {names}")
        return self

    @classmethod
    def from_yaml(cls, path: Path | str, **overrides: Any) -> ServerSettings:
        """Load a YAML config; relative paths are resolved against the file's directory."""
        path = Path(path)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        for model in data.get("models") or []:
            _resolve_paths(model, path.parent)
            for tier in model.get("escalate_to") or []:
                _resolve_paths(tier, path.parent)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)

    def resolved_signing_key(self) -> str | None:
        return self.signing_key or os.environ.get("CALIBSERVE_SIGNING_KEY") or None


def _resolve_paths(entry: dict[str, Any], base: Path) -> None:
    for key in ("model", "calibration", "probe_data"):
        if entry.get(key):
            p = Path(str(entry[key])).expanduser()
            entry[key] = str(p if p.is_absolute() else (base / p))

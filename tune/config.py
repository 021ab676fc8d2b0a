"""`TuneConfig`: every setting of one `calibserve tune` run, typed and validated.

Validation happens here, before the checkpoint or any data is read, so a bad setting is refused
with the name of the argument at fault and nothing on disk changes. The defaults are the recipe
sized for a 2-core CPU (README, "Fine-tuning"): full fine-tuning with the embedding (and so a
tied output head) frozen, one epoch of batches of 16 capped at 300 steps, bf16 autocast where the
CPU has native bf16; Gemma 3 270M on the world facts' 4,059 training examples (254 steps) about
17 minutes here, measured over 3 steps.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from calibserve.tune.errors import InvalidConfig

__all__ = ["TuneConfig", "build_config", "FLAG_NAMES", "DEFAULT_LR", "RESUME_NEUTRAL"]

# Peak learning rates per method: LoRA's low-rank update needs a larger step than full tuning.
DEFAULT_LR: dict[str, float] = {"full": 5e-5, "lora": 2e-4}

FLAG_NAMES: dict[str, str] = {
    "model": "--model",
    "data": "--data",
    "out": "--out",
    "method": "--method",
    "lora_rank": "--lora-rank",
    "lora_alpha": "--lora-alpha",
    "lora_targets": "--lora-targets",
    "train_embedding": "--train-embedding",
    "epochs": "--epochs",
    "max_steps": "--max-steps",
    "batch_size": "--batch-size",
    "group_by_length": "--group-by-length",
    "lr": "--lr",
    "schedule": "--schedule",
    "warmup": "--warmup",
    "weight_decay": "--weight-decay",
    "grad_clip": "--grad-clip",
    "max_length": "--max-length",
    "chat_template": "--chat-template",
    "device": "--device",
    "threads": "--threads",
    "autocast": "--autocast",
    "seed": "--seed",
    "save_every": "--save-every",
    "stop_after": "--stop-after",
    "calibration_aware": "--calibration-aware",
    "cal_alpha": "--cal-alpha",
    "cal_estimate_every": "--cal-estimate-every",
    "overwrite": "--overwrite",
}

# Settings that do not change what is trained: a run may be resumed with other values of these.
RESUME_NEUTRAL: frozenset[str] = frozenset(
    {"out", "overwrite", "save_every", "stop_after", "device", "threads"}
)


class TuneConfig(BaseModel):
    """One fine-tuning run. `model` is a local checkpoint directory or a Hugging Face Hub id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    data: list[Path] = Field(min_length=1)
    out: Path
    method: Literal["full", "lora"] = "full"
    lora_rank: int = Field(default=16, ge=1, le=1024)
    lora_alpha: int | None = Field(default=None, ge=1)  # None: twice the rank
    # "all-linear" (peft: every linear layer but the output head) or a comma-separated list.
    lora_targets: str = "all-linear"
    train_embedding: bool = False
    epochs: int = Field(default=1, ge=1, le=1000)
    max_steps: int = Field(default=300, ge=0)  # 0: no cap, the epochs decide
    batch_size: int = Field(default=16, ge=1, le=65536)
    group_by_length: bool = True  # batches of like-length examples (data.epoch_batches)
    lr: float | None = Field(default=None, gt=0, le=1.0)  # None: DEFAULT_LR[method]
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = Field(default=0.03, ge=0.0, lt=1.0)  # fraction of the steps
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    grad_clip: float = Field(default=1.0, ge=0.0)  # 0: no clipping
    max_length: int = Field(default=256, ge=2, le=1_000_000)
    chat_template: str | None = None  # a Jinja file, or the name of a built-in template
    device: str = "auto"
    threads: int | None = Field(default=None, ge=1, le=1024)  # None: the free cores
    autocast: Literal["auto", "bf16", "off"] = "auto"
    seed: int = 0
    save_every: int = Field(default=25, ge=0)  # 0: only when stopped
    stop_after: int | None = Field(default=None, ge=1)
    calibration_aware: Literal["none", "cft", "rcft"] = "none"
    cal_alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    cal_estimate_every: int | None = Field(default=None, ge=1)  # None: once per epoch
    overwrite: bool = False

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def lora_scale(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    @property
    def target_modules(self) -> str | list[str]:
        if self.lora_targets == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    @field_validator("data")
    @classmethod
    def _data(cls, v: list[Path]) -> list[Path]:
        for path in v:
            if not Path(path).is_file():
                raise ValueError(f"{path} is not a file")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
        return v

    @field_validator("lora_targets")
    @classmethod
    def _targets(cls, v: str) -> str:
        names = [t.strip() for t in v.split(",")]
        if v != "all-linear" and (not names or not all(re.fullmatch(r"[\w.]+", n) for n in names)):
            raise ValueError(f"{v!r}: use all-linear or module names like q_proj,v_proj")
        return v


def build_config(**kwargs: object) -> TuneConfig:
    """`TuneConfig(**kwargs)`, pydantic's errors turned into `InvalidConfig(param=flag)`."""
    try:
        return TuneConfig.model_validate(kwargs)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else ""
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        raise InvalidConfig(msg, FLAG_NAMES.get(field, field or None)) from None

"""What a step minimises: the reply tokens' cross-entropy, or seed 004's calibration-aware loss.

`--calibration-aware cft|rcft` (Xiao et al., ICML 2025) adds a term on the multiple-choice
examples' first reply token, restricted to the option letters; its bin accuracies are estimated
with the model frozen (`BinAccuracy.estimate`, the EM step) at the start of every epoch, or every
`--cal-estimate-every` steps. That objective lives in `calibserve.tune.calibration_aware`; this
module is the seam between it and the trainer, and refuses the option when that module is not
part of the build.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from calibserve.tune.data import Batch, Example, collate
from calibserve.tune.errors import InvalidConfig, InvalidData
from calibserve.tune.reply_loss import reply_logits, reply_loss

__all__ = ["Objective", "load_objective"]

CALIBRATION_AWARE = "calibserve.tune.calibration_aware"
NEEDED = ("option_view", "BinAccuracy", "calibration_aware_loss")


@dataclass(frozen=True)
class Objective:
    mode: str  # none, cft or rcft
    alpha: float
    estimate_every: int | None  # steps between bin estimates (None: at each epoch's start)
    impl: Any = None  # the calibration-aware module (None: plain SFT)

    @property
    def calibration_aware(self) -> bool:
        return self.impl is not None

    def due(self, step: int, steps_per_epoch: int, bins: Any) -> bool:
        """Must the bins be estimated before `step`?"""
        if not self.calibration_aware:
            return False
        if bins is None:
            return True
        every = self.estimate_every or steps_per_epoch
        return step % every == 0

    def loss(self, logits: torch.Tensor, batch: Batch, bins: Any) -> torch.Tensor:
        sft = reply_loss(logits, batch)
        if self.impl is None:
            return sft
        view = self.impl.option_view(logits[batch.first[batch.mc_rows]], batch.option_ids,
                                     batch.gold)
        loss: torch.Tensor = self.impl.calibration_aware_loss(sft, view, bins, self.mode,
                                                              self.alpha)
        return loss

    @torch.no_grad()
    def estimate(self, model: torch.nn.Module, examples: Sequence[Example], batch_size: int,
                 pad_id: int, device: torch.device, autocast: bool) -> Any:
        """The bins' accuracy over the multiple-choice examples, the model frozen (eval mode)."""
        was_training = model.training
        model.eval()
        try:
            return self.impl.BinAccuracy.estimate(
                self._views(model, examples, batch_size, pad_id, device, autocast))
        finally:
            model.train(was_training)

    def _views(self, model: torch.nn.Module, examples: Sequence[Example], batch_size: int,
               pad_id: int, device: torch.device, autocast: bool) -> Iterator[Any]:
        mc = [e for e in examples if e.option_ids]
        for start in range(0, len(mc), batch_size):
            batch = collate(mc[start:start + batch_size], pad_id).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = reply_logits(model, batch)
            yield self.impl.option_view(logits[batch.first[batch.mc_rows]], batch.option_ids,
                                        batch.gold)


def load_objective(mode: str, alpha: float, estimate_every: int | None,
                   examples: Sequence[Example]) -> Objective:
    """The objective `--calibration-aware` names, checked against the training examples."""
    if mode == "none":
        return Objective(mode, alpha, estimate_every)
    try:
        impl = importlib.import_module(CALIBRATION_AWARE)
    except ModuleNotFoundError:
        raise InvalidConfig(
            f"{mode} is not available in this build (no {CALIBRATION_AWARE}); use none",
            "--calibration-aware") from None
    missing = [name for name in NEEDED if not hasattr(impl, name)]
    if missing:
        raise InvalidConfig(f"{CALIBRATION_AWARE} lacks {', '.join(missing)}; use none",
                            "--calibration-aware")
    if not any(e.option_ids for e in examples):
        raise InvalidData(f"--calibration-aware {mode} needs multiple-choice examples "
                          "(items with 'choices')", "--data")
    return Objective(mode, alpha, estimate_every, impl)

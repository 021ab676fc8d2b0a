"""What a step minimises: the reply tokens' cross-entropy, or seed 004's calibration-aware loss.

`--calibration-aware cft|rcft` (Xiao et al., ICML 2025; `calibration_aware.py`) works on the
multiple-choice examples' first reply token restricted to the option letters (`option_view`:
the batch carries each option's first reply token and the gold index). CFT is the answer-only
SFT loss itself; RCFT adds the EM-style regulariser, whose bin accuracies are estimated with the
model frozen (`BinAccuracy.estimate`, the E step) over every multiple-choice training example at
the start of each epoch, or every `--cal-estimate-every` steps. This module is the seam between
that objective and the trainer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from calibserve.tune import calibration_aware as cal
from calibserve.tune.data import Batch, Example, collate
from calibserve.tune.errors import InvalidData
from calibserve.tune.reply_loss import reply_logits, reply_loss

__all__ = ["Objective", "load_objective"]


@dataclass(frozen=True)
class Objective:
    mode: str  # none, cft or rcft
    alpha: float
    estimate_every: int | None  # steps between bin estimates (None: at each epoch's start)

    @property
    def uses_bins(self) -> bool:
        return self.mode != "none" and cal.needs_bins(self.mode) and self.alpha > 0

    def due(self, step: int, steps_per_epoch: int, bins: cal.BinAccuracy | None) -> bool:
        """Must the bins be estimated before `step`?"""
        if not self.uses_bins:
            return False
        return bins is None or step % (self.estimate_every or steps_per_epoch) == 0

    def loss(self, logits: torch.Tensor, batch: Batch,
             bins: cal.BinAccuracy | None) -> torch.Tensor:
        sft = reply_loss(logits, batch)
        if not self.uses_bins:
            return sft  # none, and CFT: the answer-only SFT loss is the whole objective
        view = option_view(logits, batch)
        return cal.calibration_aware_loss(sft, view, bins, self.mode, self.alpha)

    @torch.no_grad()
    def estimate(self, model: torch.nn.Module, examples: Sequence[Example], batch_size: int,
                 pad_id: int, device: torch.device, autocast: bool) -> cal.BinAccuracy:
        """The E step: bin accuracies over the multiple-choice examples, the model frozen."""
        was_training = model.training
        model.eval()
        try:
            return cal.BinAccuracy.estimate(
                _views(model, examples, batch_size, pad_id, device, autocast))
        finally:
            model.train(was_training)


def option_view(logits: torch.Tensor, batch: Batch) -> cal.OptionView:
    """The multiple-choice rows' first reply token logits restricted to their option letters."""
    return cal.option_view(logits[batch.first[batch.mc_rows]], batch.option_ids, batch.gold)


def _views(model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int,
           device: torch.device, autocast: bool) -> Iterator[cal.OptionView]:
    mc = [e for e in examples if e.option_ids]
    for start in range(0, len(mc), batch_size):
        batch = collate(mc[start:start + batch_size], pad_id).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = reply_logits(model, batch)
        yield option_view(logits, batch)


def load_objective(mode: str, alpha: float, estimate_every: int | None,
                   examples: Sequence[Example]) -> Objective:
    """The objective `--calibration-aware` names, checked against the training examples."""
    if mode != "none" and not any(e.option_ids for e in examples):
        raise InvalidData(f"--calibration-aware {mode} works on multiple-choice examples "
                          "(items with 'choices'); the data has none", "--data")
    return Objective(mode, alpha, estimate_every)

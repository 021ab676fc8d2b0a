"""The training loop: AdamW with warm-up and a cosine or linear decay, seeded, resumable.

Step s trains on batch `s mod E` of epoch `s // E` (E steps per epoch, B examples a batch, one
batch of an epoch possibly smaller), and an epoch's batches are fixed by the seed and the epoch
(`data.epoch_batches`: shuffled, then grouped by length unless `--no-group-by-length`). So what
step s sees depends on s alone, and a run stopped after k steps and resumed from its saved
state (`resume.py`) trains the same steps on the same batches with the same optimizer state as
an uninterrupted one: the final weights are the same.

SIGINT and SIGTERM stop the run at the end of the current step, save its state and raise
`Stopped`; a second SIGINT interrupts at once (losing only the steps since the last save).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch

from calibserve.tune.config import TuneConfig
from calibserve.tune.data import LENGTH_GROUP, Example, collate, epoch_batches
from calibserve.tune.objective import Objective
from calibserve.tune.reply_loss import reply_logits
from calibserve.tune.resume import RunState, save_state

__all__ = ["Plan", "plan_steps", "lr_factor", "make_optimizer", "make_scheduler", "Stopped",
           "Trainer"]


@dataclass(frozen=True, slots=True)
class Plan:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    schedule: str


def plan_steps(n_examples: int, config: TuneConfig) -> Plan:
    """Steps per epoch, the run's total (`--epochs`, capped by `--max-steps`) and warm-up."""
    per_epoch = math.ceil(n_examples / config.batch_size)
    total = per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    return Plan(per_epoch, total, math.ceil(config.warmup * total), config.schedule)


def lr_factor(step: int, plan: Plan) -> float:
    """The learning rate of `step` as a fraction of the peak: linear warm-up from 1/w, then
    cosine or linear decay towards 0 at the end of the run, or constant."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    if plan.schedule == "constant":
        return 1.0
    progress = (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps)
    if plan.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: TuneConfig,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-d). The
    fused kernel on CPU and CUDA: on 2 CPU cores it updates Gemma 3 270M's 100 M trainable
    parameters in about 0.4 s of CPU time against 1.3-1.8 s for the default (foreach) one."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.peak_lr,
                             fused=device.type in ("cpu", "cuda") or None)


def make_scheduler(optimizer: torch.optim.Optimizer, plan: Plan) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan))


class Stopped(Exception):
    """The run stopped before its last step; its state is saved for a resume."""

    def __init__(self, step: int, total: int, signum: int | None) -> None:
        super().__init__(f"stopped after step {step} of {total}")
        self.step = step
        self.total = total
        self.signum = signum


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """SIGINT/SIGTERM append their number to the yielded list instead of killing the run (a
    second SIGINT raises KeyboardInterrupt). Outside the main thread, signals are left alone."""
    requests: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and requests:
            raise KeyboardInterrupt
        requests.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


Tick = Callable[[int, float, float], None]  # (step done, loss, seconds of the step)


@dataclass
class Trainer:
    """One run's loop over its plan, from whatever step `state` is at."""

    model: torch.nn.Module
    examples: Sequence[Example]
    objective: Objective
    config: TuneConfig
    plan: Plan
    device: torch.device
    autocast: bool
    pad_id: int
    fingerprint: dict[str, Any]
    partial: Any  # Path of OUT.partial
    optimizer: torch.optim.Optimizer
    scheduler: Any
    clock: Callable[[RunState], None]  # brings state's wall and CPU time up to now

    def __post_init__(self) -> None:
        self._epoch: tuple[int, list[list[int]]] = (-1, [])

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch` (computed once per epoch)."""
        if self._epoch[0] != epoch:
            lengths = [len(e.ids) for e in self.examples]
            group = LENGTH_GROUP if self.config.group_by_length else 1
            self._epoch = (epoch, epoch_batches(lengths, self.config.batch_size,
                                                self.config.seed, epoch, group))
        return self._epoch[1]

    def batch_at(self, step: int) -> list[int]:
        """The indices of the examples step `step` trains on."""
        epoch, k = divmod(step, self.plan.steps_per_epoch)
        return self.batches(epoch)[k]

    def save(self, state: RunState) -> None:
        self.clock(state)
        epoch = state.step // self.plan.steps_per_epoch
        order = [i for b in self.batches(epoch) for i in b] \
            if state.step < self.plan.total_steps else []
        save_state(self.partial, self.fingerprint, self.model, self.optimizer, self.scheduler,
                   state, order)

    def step(self, state: RunState) -> float:
        """One optimizer step; returns its loss."""
        if self.objective.due(state.step, self.plan.steps_per_epoch, state.bins):
            state.bins = self.objective.estimate(self.model, self.examples,
                                                 self.config.batch_size, self.pad_id,
                                                 self.device, self.autocast)
            state.estimates.append({"step": state.step, **state.bins.to_dict()})
        chosen = self.batch_at(state.step)
        batch = collate([self.examples[i] for i in chosen], self.pad_id).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = reply_logits(self.model, batch)
        loss = self.objective.loss(logits, batch, state.bins)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        state.tokens += batch.n_tokens
        return float(loss.detach())

    def run(self, state: RunState, tick: Tick | None = None) -> RunState:
        """Train from `state.step` to the end of the plan (or until stopped)."""
        self.model.train()
        started_at = state.step
        with stop_requests() as requests:
            while state.step < self.plan.total_steps:
                t0, c0 = time.perf_counter(), time.process_time()
                loss = self.step(state)
                seconds = time.perf_counter() - t0
                state.step += 1
                state.losses.append(loss)
                state.seconds_per_step.append(seconds)
                state.cpu_seconds_per_step.append(time.process_time() - c0)
                if tick is not None:
                    tick(state.step, loss, seconds)
                done = state.step >= self.plan.total_steps
                stop_after = self.config.stop_after
                asked = bool(requests) or (stop_after is not None
                                           and state.step - started_at >= stop_after)
                if not done and (asked or (self.config.save_every
                                           and state.step % self.config.save_every == 0)):
                    self.save(state)
                if asked and not done:
                    raise Stopped(state.step, self.plan.total_steps,
                                  requests[0] if requests else None)
        self.model.eval()
        return state

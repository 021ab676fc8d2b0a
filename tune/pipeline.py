"""One `calibserve tune` run, start to finish: check, read, tokenize, load, train, write.

The cheap refusals come first (settings, OUT, the data files, the chat template), then the model
is loaded and the run resumes from `OUT.partial` when one with the same fingerprint is there.
When the last step is done the checkpoint is written atomically and `OUT.partial` is removed.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from calibserve.publish import Busy, exclusive, lock_path
from calibserve.tune.checkpoint import stop_token_ids, write_checkpoint
from calibserve.tune.config import RESUME_NEUTRAL, TuneConfig
from calibserve.tune.data import (
    Encoded,
    Encoder,
    check_option_tokens,
    collate,
    data_digest,
    encode,
    load_records,
)
from calibserve.tune.errors import OutputExists
from calibserve.tune.info import FORMAT, loss_summary, now, versions
from calibserve.tune.model import (
    Prepared,
    cpu_threads,
    device_name,
    load_model,
    load_tokenizer,
    plain_model,
    prepare_model,
    resolve_device,
    use_autocast,
)
from calibserve.tune.objective import load_objective
from calibserve.tune.progress import step_log, step_progress
from calibserve.tune.reply_loss import check_reply_logits
from calibserve.tune.resume import RunState, load_state, partial_dir
from calibserve.tune.templates import resolve_template
from calibserve.tune.trainer import Plan, Trainer, make_optimizer, make_scheduler, plan_steps

__all__ = ["TuneResult", "run_tune"]


@dataclass(frozen=True, slots=True)
class TuneResult:
    out: Path
    steps: int
    info: dict[str, Any]


def _fingerprint(config: TuneConfig, data_sha: str, template: str) -> dict[str, Any]:
    """What decides the trained weights: settings (not where things are written), the data's
    and template's content, and the checkpoint's identity."""
    settings = config.model_dump(mode="json", exclude=set(RESUME_NEUTRAL) | {"data"})
    source = Path(config.model) / "config.json"
    model_id = (hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file()
                else config.model)
    return {**settings, "data_sha256": data_sha,
            "template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "model_config_sha256": model_id}


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def _info(config: TuneConfig, plan: Plan, encoded: Encoded, state: RunState,
          prepared: Prepared, device: torch.device, autocast: bool, template_source: str,
          data: tuple[str, dict[str, str]]) -> dict[str, Any]:
    n = len(encoded.examples)
    recipe = config.model_dump(mode="json")
    recipe.update(
        lr=config.peak_lr,
        lora_alpha=config.lora_scale if config.method == "lora" else None,
        steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps,
        warmup_steps=plan.warmup_steps, autocast_bf16=autocast,
        chat_template=template_source,
        loss="cross-entropy on the reply tokens only (logits computed at those positions)"
        + ("; rcft: (1 - alpha) * that + alpha * 1e-3 * L_cal (tune/calibration_aware.py)"
           if config.calibration_aware == "rcft" else ""),
    )
    return {
        "format": FORMAT,
        "created": now(),
        "model": config.model,
        "recipe": recipe,
        "data": {
            "sha256": data[0], "files": data[1], "examples": n, "by_kind": encoded.kinds,
            "dropped_longer_than_max_length": encoded.too_long,
            "tokens": encoded.n_tokens, "reply_tokens": encoded.n_reply_tokens,
            "tokens_trained": state.tokens,
            "epochs_covered": round(plan.total_steps * config.batch_size / n, 4),
            "replies_ended_by_eos_fallback": encoded.reply_fallback,
        },
        "parameters": {
            "total": prepared.total, "trainable": prepared.trainable,
            "embedding_frozen": prepared.embedding_frozen,
            "output_head_tied_to_embedding": prepared.head_tied,
        },
        "loss": loss_summary(state.losses),
        "calibration_aware": {
            "mode": config.calibration_aware, "alpha": config.cal_alpha,
            "estimate_every": config.cal_estimate_every or plan.steps_per_epoch,
            "bin_estimates": state.estimates,  # the E steps: per-bin counts, accuracy, ECE
        } if config.calibration_aware != "none" else None,
        "time": {
            "wall_seconds": round(state.wall_seconds, 1),
            "cpu_minutes": round(state.cpu_seconds / 60, 3),
            "seconds_per_step_mean": round(statistics.fmean(state.seconds_per_step), 3)
            if state.seconds_per_step else None,
            "seconds_per_step_median": round(statistics.median(state.seconds_per_step), 3)
            if state.seconds_per_step else None,
            # CPU time of all threads: what a step costs when other work shares the machine
            "cpu_seconds_per_step_median": round(statistics.median(state.cpu_seconds_per_step), 3)
            if state.cpu_seconds_per_step else None,
            "sessions": state.sessions,
            "per_step_seconds": [round(s, 3) for s in state.seconds_per_step],
            "per_step_cpu_seconds": [round(s, 3) for s in state.cpu_seconds_per_step],
        },
        "device": {"type": device.type, "name": device_name(device),
                   "threads": torch.get_num_threads(), "bf16_autocast": autocast},
        "versions": versions(),
    }


def _run(config: TuneConfig, progress: bool, console: Console | None) -> TuneResult:
    t_wall, t_cpu = time.monotonic(), time.process_time()
    console = console or Console(stderr=True, quiet=not progress)
    if not progress:  # transformers' own loading and writing bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if config.out.exists() and not config.overwrite:
        raise OutputExists(f"{config.out} exists (pass --overwrite to replace it)", "--out")
    device = resolve_device(config.device)
    autocast = use_autocast(config.autocast, device)
    records = load_records(config.data)
    data = data_digest(config.data)
    tokenizer = load_tokenizer(config.model)
    template, template_source = resolve_template(config.chat_template, tokenizer)
    encoded = encode(records, Encoder(tokenizer, template), config.max_length)
    objective = load_objective(config.calibration_aware, config.cal_alpha,
                               config.cal_estimate_every, encoded.examples)
    if config.calibration_aware != "none":
        check_option_tokens(encoded.examples, tokenizer)
    pad_id = _pad_id(tokenizer)

    torch.manual_seed(config.seed)  # LoRA's initial adapters
    prepared = prepare_model(load_model(config.model), config, device)
    check_reply_logits(prepared.model, collate(encoded.examples[:1], pad_id).to(device))
    plan = plan_steps(len(encoded.examples), config)
    optimizer = make_optimizer(prepared.model, config, device)
    scheduler = make_scheduler(optimizer, plan)
    fingerprint = _fingerprint(config, data[0], template)
    partial = partial_dir(config.out)
    console.print(_summary(config, prepared, plan, encoded, autocast, device))
    resumed = load_state(partial, fingerprint, prepared.model, optimizer, scheduler)
    state, _ = resumed if resumed else (RunState(), [])
    if resumed:
        console.print(f"resuming {partial} at step {state.step} of {plan.total_steps}")
    base_wall, base_cpu = state.wall_seconds, state.cpu_seconds

    def clock(s: RunState) -> None:
        s.wall_seconds = base_wall + time.monotonic() - t_wall
        s.cpu_seconds = base_cpu + time.process_time() - t_cpu

    trainer = Trainer(prepared.model, encoded.examples, objective, config, plan, device,
                      autocast, pad_id, fingerprint, partial, optimizer, scheduler, clock)
    with step_progress(console, progress) as bar:
        task = bar.add_task("tune", total=plan.total_steps, completed=state.step, loss="-",
                            sps="-")

        log = step_log(console, progress, plan.total_steps)

        def tick(step: int, loss: float, seconds: float) -> None:
            bar.update(task, completed=step, loss=f"{loss:.4f}", sps=f"{seconds:.2f}")
            log(step, loss, seconds)

        state = trainer.run(state, tick)
    clock(state)
    info = _info(config, plan, encoded, state, prepared, device, autocast, template_source, data)
    first = encoded.examples[0]
    stop_ids = stop_token_ids(tokenizer, list(first.ids[first.reply_start:]))
    write_checkpoint(plain_model(prepared.model), tokenizer, template, info, config.out, stop_ids)
    shutil.rmtree(partial, ignore_errors=True)
    return TuneResult(config.out, state.step, info)


def _summary(config: TuneConfig, prepared: Prepared, plan: Plan, encoded: Encoded,
             autocast: bool, device: torch.device) -> str:
    """One line on what is about to be trained, and how."""
    frozen = ("embedding frozen (the output head is the same matrix, so frozen too)"
              if prepared.head_tied else "embedding frozen") if prepared.embedding_frozen \
        else "embedding trained"
    what = "LoRA adapters" if config.method == "lora" else "full"
    return (f"{len(encoded.examples)} examples ({encoded.n_reply_tokens} reply tokens), "
            f"{plan.total_steps} steps of {config.batch_size}; {what}: "
            f"{prepared.trainable / 1e6:.1f} M of {prepared.total / 1e6:.1f} M parameters "
            f"trained, {frozen}; {device.type}"
            f"{', bf16 autocast' if autocast else ''}, {torch.get_num_threads()} threads")


def run_tune(config: TuneConfig, *, progress: bool = True,
             console: Console | None = None) -> TuneResult:
    """Train `config.model` on `config.data` and write the checkpoint to `config.out`; a second
    run into the same OUT while one is going is refused (it would share OUT.partial)."""
    lock = lock_path(partial_dir(config.out))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cpu_threads(config.threads, threads))
        with exclusive(lock, wait=False):
            return _run(config, progress, console)
    except Busy:
        raise OutputExists(f"another calibserve tune is writing {config.out}", "--out") from None
    finally:
        torch.set_num_threads(threads)

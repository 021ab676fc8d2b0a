"""`calibserve tune`: the typer command (the console script registers it on the main app).

Every option maps to a `TuneConfig` field. Errors the user can fix are printed as one line that
names the argument, with exit status 2 and no traceback. A run stopped by SIGINT or SIGTERM
saves its state first (exit 130 or 143); `--stop-after N` stops it on purpose after N steps
(exit 0); in every case the same command resumes it.
"""

from __future__ import annotations

import signal
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from calibserve.tune.config import build_config
from calibserve.tune.errors import TuneError

__all__ = ["tune", "app"]


class Method(StrEnum):
    full = "full"
    lora = "lora"


class Schedule(StrEnum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class Autocast(StrEnum):
    auto = "auto"
    bf16 = "bf16"
    off = "off"


class CalibrationAware(StrEnum):
    none = "none"
    cft = "cft"
    rcft = "rcft"


def tune(
    model: Annotated[str, typer.Option("--model", help="Checkpoint to tune: directory or Hub id.")],
    data: Annotated[list[Path], typer.Option(
        "--data", help="Training JSONL (repeatable): chats {\"messages\": [...]} whose last "
        "message is the reply, or eval items (multiple choice or short answer).")],
    out: Annotated[Path, typer.Option("--out", help="Output checkpoint directory (atomic).")],
    method: Annotated[Method, typer.Option("--method", help="full: every weight but the "
                                           "embedding; lora: low-rank adapters, merged.")]
    = Method.full,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank.")] = 16,
    lora_alpha: Annotated[int | None, typer.Option(
        "--lora-alpha", help="LoRA scale numerator (default: twice the rank).")] = None,
    lora_targets: Annotated[str, typer.Option(
        "--lora-targets", help="all-linear, or module names: q_proj,v_proj,...")] = "all-linear",
    train_embedding: Annotated[bool, typer.Option(
        "--train-embedding/--freeze-embedding", help="Train the embedding (and the output head "
        "when tied to it, as in Gemma and SmolLM2). Frozen by default.")] = False,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data.")] = 1,
    max_steps: Annotated[int, typer.Option(
        "--max-steps", help="Stop the schedule at N steps (0: the epochs decide).")] = 300,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per step.")] = 16,
    group_by_length: Annotated[bool, typer.Option(
        "--group-by-length/--no-group-by-length", help="Batch examples of like length "
        "together (less padding; the batches are still shuffled).")] = True,
    lr: Annotated[float | None, typer.Option(
        "--lr", help="Peak learning rate (default 5e-5 full, 2e-4 LoRA).")] = None,
    schedule: Annotated[Schedule, typer.Option("--schedule", help="Decay after warm-up.")]
    = Schedule.cosine,
    warmup: Annotated[float, typer.Option("--warmup", help="Warm-up, fraction of the steps.")]
    = 0.03,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW decay.")] = 0.0,
    grad_clip: Annotated[float, typer.Option(
        "--grad-clip", help="Gradient norm clip (0: none).")] = 1.0,
    max_length: Annotated[int, typer.Option(
        "--max-length", help="Longer examples are dropped (counted in train_info.json).")] = 256,
    chat_template: Annotated[str | None, typer.Option(
        "--chat-template", help="Jinja file or built-in (gemma) for a checkpoint without a "
        "template; written into OUT.")] = None,
    device: Annotated[str, typer.Option(
        "--device", help="auto (CUDA if present), cpu, cuda, cuda:N, mps.")] = "auto",
    threads: Annotated[int | None, typer.Option(
        "--threads", help="CPU threads (default: the cores the load average leaves free, at "
        "least one).")] = None,
    autocast: Annotated[Autocast, typer.Option(
        "--autocast", help="bf16 autocast: auto = where the device has native bf16.")]
    = Autocast.auto,
    seed: Annotated[int, typer.Option("--seed", help="Data order and initialisation.")] = 0,
    save_every: Annotated[int, typer.Option(
        "--save-every", help="Save resumable state to OUT.partial every N steps (0: only "
        "when stopped).")] = 25,
    stop_after: Annotated[int | None, typer.Option(
        "--stop-after", help="Stop after N steps of this invocation; rerun to resume.")] = None,
    calibration_aware: Annotated[CalibrationAware, typer.Option(
        "--calibration-aware", help="Seed 004 (Xiao et al. 2025) on the multiple-choice "
        "examples: cft = answer-only SFT; rcft adds the EM-style ECE regulariser.")]
    = CalibrationAware.none,
    cal_alpha: Annotated[float, typer.Option(
        "--cal-alpha", help="RCFT: loss = (1 - a) SFT + a * 1e-3 L_cal.")] = 0.5,
    cal_estimate_every: Annotated[int | None, typer.Option(
        "--cal-estimate-every", help="Steps between bin-accuracy estimates (default: each "
        "epoch).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")]
    = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress display.")] = False,
) -> None:
    """Fine-tune MODEL on chat or eval data (loss on replies only) and write a checkpoint to OUT."""
    from calibserve.tune.pipeline import run_tune
    from calibserve.tune.trainer import Stopped

    try:
        config = build_config(
            model=model, data=data, out=out, method=method.value, lora_rank=lora_rank,
            lora_alpha=lora_alpha, lora_targets=lora_targets, train_embedding=train_embedding,
            epochs=epochs, max_steps=max_steps, batch_size=batch_size,
            group_by_length=group_by_length, lr=lr,
            schedule=schedule.value, warmup=warmup, weight_decay=weight_decay,
            grad_clip=grad_clip, max_length=max_length, chat_template=chat_template,
            device=device, threads=threads, autocast=autocast.value, seed=seed,
            save_every=save_every,
            stop_after=stop_after, calibration_aware=calibration_aware.value,
            cal_alpha=cal_alpha, cal_estimate_every=cal_estimate_every, overwrite=overwrite,
        )
        result = run_tune(config, progress=not quiet)
    except TuneError as exc:
        where = f"Invalid value for '{exc.param}': " if exc.param else ""
        typer.echo(f"Error: {where}{exc.message}", err=True)
        raise typer.Exit(2) from None
    except Stopped as exc:
        typer.echo(f"Stopped after step {exc.step} of {exc.total}; state saved in "
                   f"{out}.partial: rerun the same command to resume.", err=True)
        raise typer.Exit(0 if exc.signum is None else 128 + exc.signum) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted: rerun the same command to resume from the last saved step.",
                   err=True)
        raise typer.Exit(128 + signal.SIGINT) from None
    loss = result.info["loss"]
    typer.echo(f"{result.out}: {result.steps} steps, loss {loss.get('first')} -> "
               f"{loss.get('last')}, {result.info['time']['wall_seconds']} s")


app = typer.Typer(add_completion=False, help="calibserve tune")
app.command("tune")(tune)

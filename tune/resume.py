"""The resumable state of an unfinished run: `OUT.partial/state.pt` beside the output.

Every `--save-every` steps, and when the run is stopped (SIGINT, SIGTERM, `--stop-after`), the
trainer writes what the next step depends on: the trainable parameters (the frozen ones are the
checkpoint's own and are read again from it), the optimizer and scheduler state, the step, the
order of the current epoch, the RNG state, the per-step losses and the time spent so far, and
the calibration-aware objective's bin estimate when there is one. The file is written under a
temporary name and renamed, so a kill mid-save leaves the previous state.

The state records the run's fingerprint (every setting that changes what is trained, the data's
sha256 and the checkpoint's identity): `calibserve tune` with the same arguments resumes from it,
with other arguments it refuses and says which differ.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from calibserve.publish import write_atomic
from calibserve.tune.errors import ResumeMismatch

__all__ = ["RunState", "partial_dir", "save_state", "load_state", "STATE_FILE"]

STATE_FILE = "state.pt"
FORMAT = 1


def partial_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.partial"


@dataclass
class RunState:
    """Where a run is; everything but the tensors is plain data."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds_per_step: list[float] = field(default_factory=list)
    cpu_seconds_per_step: list[float] = field(default_factory=list)  # all threads' CPU time
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    tokens: int = 0  # tokens in the batches trained on so far (prompt and reply)
    sessions: int = 1  # invocations that trained this run (1: never resumed)
    bins: Any = None  # the calibration-aware objective's current bin accuracies
    estimates: list[dict[str, Any]] = field(default_factory=list)  # each E step's summary


def save_state(directory: Path, fingerprint: dict[str, Any], model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, scheduler: Any, state: RunState,
               order: list[int]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters()
                      if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "order": order,
        "state": state,
    }
    tmp = directory / f".{STATE_FILE}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    write_atomic(directory / "progress.json",
                 json.dumps({"step": state.step, "fingerprint": fingerprint}, indent=1) + "\n")


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if saved.get(k) != current.get(k)]


def load_state(directory: Path, fingerprint: dict[str, Any], model: torch.nn.Module,
               optimizer: torch.optim.Optimizer,
               scheduler: Any) -> tuple[RunState, list[int]] | None:
    """Restore a saved run into `model`, `optimizer` and `scheduler`; None if there is none."""
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    # Our own file, beside the output the user asked for; it holds a dataclass, not only tensors.
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT:
        raise ResumeMismatch(f"{directory} was written by another version of calibserve tune; "
                             "remove it to start over", "--out")
    differ = _differences(payload["fingerprint"], fingerprint)
    if differ:
        raise ResumeMismatch(
            f"{directory} holds an unfinished run with other settings ({', '.join(differ)}); "
            "rerun with the same arguments to resume it, or remove it to start over", "--out")
    params = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = payload["trainable"]
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != wanted:
        raise ResumeMismatch(f"{directory} holds other trainable parameters than this run's",
                             "--out")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(payload["optimizer"])  # moves its state to the params' device
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"])
    state: RunState = payload["state"]
    state.sessions += 1
    return state, list(payload["order"])

"""Everything a merge checks before it writes a byte: output path, data, parents, tokenizers,
device. A refusal here (a `MergeError` naming the flag) leaves the file system untouched."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibserve.merge.checkpoint import PairPlan, check_tokenizers, open_checkpoint, plan_pair
from calibserve.merge.config import MergeConfig
from calibserve.merge.diversity import load_open_prompts
from calibserve.merge.errors import InvalidConfig, InvalidData, OutputExists
from calibserve.merge.evaluate import load_items, short_answer_split
from calibserve.merge.model import check_device

__all__ = ["SPLITS", "Prepared", "check_out", "prepare"]

SPLITS = ("select", "calibrate", "test")


@dataclass
class Prepared:
    """Everything validated before a byte is written."""

    config: MergeConfig
    out: Path
    plan: PairPlan
    items: dict[str, list[dict[str, Any]]]
    skipped: dict[str, int]
    prompts: list[str] | None
    notes: list[str] = field(default_factory=list)
    # Short-answer items scored at every point (select) and in the held-out view (test); empty
    # when the data has none or `config.short_answers` is off.
    short_items: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that is a file, or a non-empty directory without `overwrite`."""
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{out} exists and is not a directory", "--out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{out} already exists and is not empty (pass --overwrite)", "--out")


def prepare(config: MergeConfig) -> Prepared:
    """All validation: output path, data, parents, tokenizers, device. Writes nothing."""
    out = config.out.expanduser().resolve()
    check_out(out, config.overwrite)
    data = config.data.expanduser()
    if not data.is_dir():
        raise InvalidData(
            f"{data} is not a directory with select.jsonl and calibrate.jsonl", "--data"
        )
    items: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, int] = {}
    for split in SPLITS:
        path = data / f"{split}.jsonl"
        if split == "test" and not path.exists():
            continue
        items[split], skipped[split] = load_items(path, config.max_items)
    short_items: dict[str, list[dict[str, Any]]] = {}
    if config.short_answers:
        for split in ("select", "test"):
            found = short_answer_split(data, split)[: config.max_items]
            if found:
                short_items[split] = found
    if config.objective != "multiple-choice" and not short_items.get("select"):
        why = ("--no-short-answers was given" if not config.short_answers else
               f"{data} has no short-answer items in the select split (short_select.jsonl, or "
               "short-answer lines of select.jsonl)")
        raise InvalidConfig(f"the {config.objective} objective needs short answers, but {why}",
                            "--select")
    prompts = None
    if config.diversity:
        candidates = [data / "open_prompts.jsonl", data.parent / "open_prompts.jsonl"]
        path = next((p for p in candidates if p.is_file()), candidates[0])
        prompts = load_open_prompts(path)
    check_device(config.device)
    base = open_checkpoint(config.base, "--base")
    aligned = open_checkpoint(config.aligned, "--aligned")
    plan = plan_pair(base, aligned)
    check_tokenizers(plan)
    notes = list(plan.notes)
    for split, n in skipped.items():
        if n and split not in short_items:
            notes.append(
                f"{n} short-answer items in {split}.jsonl were not scored in the sweep (only "
                "the select and test splits' short answers are; calibrate's are what the "
                "free-form fit uses)" if config.short_answers else
                f"{n} short-answer items in {split}.jsonl were not scored (--no-short-answers)"
            )
    return Prepared(config, out, plan, items, skipped, prompts, notes, short_items)

"""Building a demo world: data, tokenizer, the three models, their measured calibration, the cache.

`build_world` is the entry point. It returns a verified world directory, building it only when no
trusted copy with the same settings hash exists.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from calibserve.demo import cache
from calibserve.demo.chat import ANSWER_PREFIX, LETTERS, format_mc_prompt, render_exchange
from calibserve.demo.corpus import (
    base_format_examples,
    eval_splits,
    open_prompts,
    pretraining_documents,
    sft_examples,
    short_answer_splits,
    without_long_tail,
)
from calibserve.demo.evaluate import mc_metrics, option_probs, short_metrics
from calibserve.demo.settings import CODE_VERSION, DemoSettings
from calibserve.demo.tokenizer import build_tokenizer
from calibserve.demo.train import make_model, pretrain, sft, sft_steps
from calibserve.demo.world import SPLITS, World, make_world
from calibserve.publish import build_once, publish_dir, staging

MODELS = ("base", "aligned", "expert")


class DemoBuildError(RuntimeError):
    """The demo world could not be built, or was built but does not show what it must."""


class CalibrationGapError(DemoBuildError):
    """The aligned model is not clearly worse calibrated (or is less accurate) than the base."""


def default_dir(settings: DemoSettings, seed: int) -> Path:
    return cache.home() / "demo" / settings.digest(seed)


def build_world(
    out: Path | None = None,
    seed: int = 0,
    settings: DemoSettings | None = None,
    progress: bool = True,
) -> Path:
    """Return a verified demo world, building (or copying from the cache) only if needed."""
    settings = settings or DemoSettings()
    if out is None:
        return _ensure_cached(settings, seed, progress)
    digest = settings.digest(seed)

    def copy(dest: Path) -> None:
        if dest.exists() and not (dest / cache.MANIFEST).exists() and any(dest.iterdir()):
            raise DemoBuildError(f"{dest} is a non-empty directory that is not a demo world")
        cached = _ensure_cached(settings, seed, progress)
        with staging(dest) as tmp:
            shutil.copytree(cached, tmp, dirs_exist_ok=True)
            if not cache.verify(tmp, digest):
                raise DemoBuildError(f"copy of {cached} into {dest} does not match its manifest")
            publish_dir(tmp, dest)

    # The lock is taken (and so the destination touched) first: an unwritable --out fails
    # before any training.
    return build_once(Path(out), lambda p: cache.verify(p, digest), copy)


def _ensure_cached(settings: DemoSettings, seed: int, progress: bool) -> Path:
    """The verified cached world for these settings, built under a lock if missing or corrupt."""
    digest = settings.digest(seed)

    def build(cached: Path) -> None:
        with staging(cached) as tmp:
            _build_into(tmp, settings, seed, progress)
            cache.write_manifest(tmp, digest, seed)
            publish_dir(tmp, cached)

    return build_once(default_dir(settings, seed), lambda p: cache.verify(p, digest), build)


@contextmanager
def _timed(record: dict[str, float], phase: str) -> Iterator[None]:
    """Adds the phase's wall time to `record` (world.json's `phase_seconds`)."""
    started = time.monotonic()
    try:
        yield
    finally:
        record[phase] = round(record.get(phase, 0.0) + time.monotonic() - started, 1)


def _by_reading(
    probs: np.ndarray, items: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, float]]:
    """Multiple-choice metrics on the long-tail items and on the rest (the ones the base read)."""
    tail = np.array([bool(it.get("long_tail")) for it in items])
    out: dict[str, dict[str, float]] = {}
    for name, mask in (("long_tail", tail), ("read_by_base", ~tail)):
        if mask.any():
            chosen = [it for it, keep in zip(items, mask, strict=True) if keep]
            out[name] = mc_metrics(probs[mask], chosen)
    return out


@contextmanager
def _torch_state(threads: int) -> Iterator[None]:
    """Fixed threads and deterministic kernels while building; the caller's state afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def _save_model(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path
) -> None:
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    hf_logging.disable_progress_bar()  # our own progress display is enough
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()
    # The chat template goes inside tokenizer_config.json (no separate .jinja file), and the
    # class name is the one every transformers version (and vLLM) knows.
    tokenizer.save_pretrained(path, save_jinja_files=False)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass
class Materials:
    """What a build trains and evaluates on, generated in the build's RNG order."""

    world: World
    splits: dict[str, list[dict[str, Any]]]
    short: dict[str, list[dict[str, Any]]]  # split -> short-answer items
    prompts: list[dict[str, Any]]
    tokenizer: PreTrainedTokenizerFast
    doc_ids: list[list[int]]  # the whole corpus: the expert's continued pretraining
    base_doc_ids: list[list[int]]  # without the long-tail entities: the base's pretraining
    sft_ids: list[list[int]]
    format_ids: list[list[int]]  # the base's format SFT (open and multiple-choice chat forms)
    pad_id: int
    eos_id: int


def make_materials(settings: DemoSettings, seed: int) -> Materials:
    """World, corpus, SFT set, splits and tokenizer for `settings` and `seed` (also used by
    demo/tuning/tune.py, so a tuning trial sees exactly what a build would)."""
    rng = np.random.default_rng(seed)
    ws = settings.world
    world = make_world(ws, rng)
    docs = pretraining_documents(world, ws, rng)
    sft_texts = sft_examples(world, ws, rng)
    splits = eval_splits(world, ws, rng)
    prompts = open_prompts(world, ws)
    format_texts = base_format_examples(world, ws)  # no draws: exact proportions
    # Drawn after everything else, so the multiple-choice splits are those of older worlds.
    short = short_answer_splits(world, ws, rng)

    vocab_texts = [*docs, *sft_texts, ANSWER_PREFIX, " ".join(LETTERS)]
    vocab_texts += [format_mc_prompt(item) for items in splits.values() for item in items]
    vocab_texts += [f"{s['question']} {s['answer']}" for items in short.values() for s in items]
    vocab_texts += [p["prompt"] for p in prompts]
    tokenizer = build_tokenizer(vocab_texts)

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    return Materials(world, splits, short, prompts, tokenizer,
                     [encode(d) for d in docs],
                     [encode(d) for d in without_long_tail(docs, world)],
                     [encode(t) for t in sft_texts],
                     [encode(t) for t in format_texts],
                     int(tokenizer.pad_token_id), int(tokenizer.eos_token_id))


def _build_into(root: Path, settings: DemoSettings, seed: int, show: bool) -> dict[str, Any]:
    started = time.monotonic()
    mat = make_materials(settings, seed)
    world, splits, short, prompts = mat.world, mat.splits, mat.short, mat.prompts
    tokenizer, doc_ids, sft_ids = mat.tokenizer, mat.doc_ids, mat.sft_ids
    pad_id, eos_id = mat.pad_id, mat.eos_id
    metrics: dict[str, dict[str, float]] = {}
    by_reading: dict[str, dict[str, dict[str, float]]] = {}
    short_scores: dict[str, dict[str, float]] = {}
    phase_seconds: dict[str, float] = {}
    with _torch_state(settings.threads), _progress(show) as bar:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)

        def run(name: str, total: int) -> Any:
            task = bar.add_task(name, total=total, loss=float("nan"))
            return lambda loss: bar.update(task, advance=1, loss=loss)

        base = make_model(settings.model, len(tokenizer), pad_id, eos_id)
        with _timed(phase_seconds, "base"):
            pretrain(base, mat.base_doc_ids, eos_id, settings.pretrain, gen,
                     run("pretrain base", settings.pretrain.steps))
            if settings.base_format_sft is not None and mat.format_ids:
                sft(base, mat.format_ids, pad_id, settings.base_format_sft, gen,
                    run("format SFT base",
                        sft_steps(len(mat.format_ids), settings.base_format_sft)))
        aligned = copy.deepcopy(base)
        with _timed(phase_seconds, "aligned"):
            sft(aligned, sft_ids, pad_id, settings.sft, gen,
                run("SFT aligned", sft_steps(len(sft_ids), settings.sft)))
        expert = copy.deepcopy(base)
        with _timed(phase_seconds, "expert"):
            if settings.expert_extra_steps:
                pretrain(expert, doc_ids, eos_id, settings.pretrain, gen,
                         run("pretrain expert", settings.expert_extra_steps),
                         steps=settings.expert_extra_steps)
            sft(expert, sft_ids, pad_id, settings.expert_sft, gen,
                run("SFT expert", sft_steps(len(sft_ids), settings.expert_sft)))
        models = {"base": base, "aligned": aligned, "expert": expert}
        task = bar.add_task("evaluate", total=len(models), loss=float("nan"))
        with _timed(phase_seconds, "evaluate"):
            for name, model in models.items():
                probs = option_probs(model, tokenizer, splits["test"])
                metrics[name] = mc_metrics(probs, splits["test"])
                by_reading[name] = _by_reading(probs, splits["test"])
                short_scores[name] = short_metrics(model, tokenizer, short["test"])
                bar.update(task, advance=1)
        for name, model in models.items():
            _save_model(model, tokenizer, root / name)

    for split in SPLITS:
        _write_jsonl(root / "data" / f"{split}.jsonl", splits[split])
    for split in SPLITS:
        _write_jsonl(root / "data" / f"short_{split}.jsonl", short[split])
    _write_jsonl(root / "data" / "open_prompts.jsonl", prompts)
    report = {
        "code_version": CODE_VERSION,
        "seed": seed,
        "digest": settings.digest(seed),
        "settings": settings.model_dump(mode="json"),
        "build_seconds": round(time.monotonic() - started, 1),
        # Training wall time of each model (the base includes its format SFT) and of evaluation.
        "phase_seconds": phase_seconds,
        "chat_format": {
            "example": render_exchange(format_mc_prompt(splits["test"][0]), "A"),
            "letters": list(LETTERS[:4]),
        },
        "sizes": {split: len(items) for split, items in splits.items()},
        "short_sizes": {split: len(items) for split, items in short.items()},
        "metrics": {"split": "test", "n_bins": 15, **metrics},
        # The same, on the long-tail entities (only the expert read about them) and on the rest.
        "metrics_by_reading": {"split": "test", "n_bins": 15, **by_reading},
        # The first generated token against the sampled gold value (greedy, chat format).
        "short_answer_metrics": {"split": "test", "n_bins": 15, **short_scores},
        "world": world.to_json(),
    }
    (root / "world.json").write_text(json.dumps(report, indent=1) + "\n")
    if settings.check_gap:
        check_gap(metrics, settings.min_ece_ratio)
    return report


def check_gap(metrics: Mapping[str, Mapping[str, float]], min_ratio: float) -> None:
    """Fail loudly unless alignment made the model worse calibrated and no less accurate."""
    base, aligned = metrics["base"], metrics["aligned"]
    problems = []
    if aligned["ece"] < min_ratio * base["ece"]:
        problems.append(
            f"aligned ECE {aligned['ece']:.3f} < {min_ratio} x base ECE {base['ece']:.3f}"
        )
    if aligned["accuracy"] < base["accuracy"]:
        problems.append(
            f"aligned accuracy {aligned['accuracy']:.3f} < base accuracy {base['accuracy']:.3f}"
        )
    if problems:
        raise CalibrationGapError(
            "the demo world does not show the alignment-calibration trade-off: "
            + "; ".join(problems)
            + " | measured: "
            + ", ".join(f"{k} acc {m['accuracy']:.3f} ECE {m['ece']:.3f}"
                        for k, m in metrics.items())
        )

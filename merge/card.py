"""The merged model's card, `OUT/model/README.md`: where the model came from and why this lambda."""

from __future__ import annotations

from calibserve.merge.calibrate import Calibration
from calibserve.merge.prepare import Prepared
from calibserve.merge.select import Selection
from calibserve.merge.sweep import Point

__all__ = ["model_card"]


def model_card(p: Prepared, sel: Selection, points: list[Point], cal: Calibration) -> str:
    """Hugging Face model card (YAML front matter, then Markdown) for the selected point."""
    chosen = points[sel.index]
    lines = [
        "---",
        "tags: [calibserve, merge, calibration]",
        "---",
        f"# Merged model (lambda = {sel.lam:g})",
        "",
        "theta = (1 - lambda) * base + lambda * aligned"
        + (" (per-tensor spherical interpolation)" if p.config.method == "slerp" else ""),
        "",
        f"- base: `{p.plan.base.ref}`",
        f"- aligned: `{p.plan.aligned.ref}`",
        f"- method: {p.config.method}; selection rule: {sel.rule} on the {sel.objective} "
        "objective",
        f"- select split: accuracy {chosen.accuracy:.4f}, ECE {chosen.ece:.4f}, "
        f"Brier {chosen.metrics['brier']:.4f}",
        *([f"- select split, short answers (raw free-form confidence): accuracy "
           f"{chosen.free_form_metrics['accuracy']:.4f}, ECE "
           f"{chosen.free_form_metrics['ece']:.4f}"] if chosen.free_form_metrics else []),
        (f"- option temperature {cal.temperature:.4g} fitted label-free (DACA against the base, "
         f"agreement {cal.metrics['agreement']:.3f}; no thresholds): ECE against the base's "
         f"probability of the answer {cal.metrics['ece_raw']:.4f} raw, "
         f"{cal.metrics['ece_calibrated']:.4f} calibrated"
         if cal.metrics.get("labels") == "none" else
         f"- calibrator ({cal.calibrator.to_dict()['type']}) on the calibrate split: ECE "
         f"{cal.metrics['ece_raw']:.4f} raw, {cal.metrics['ece_calibrated']:.4f} calibrated"),
        "",
        f"Why this point: {sel.reason}",
        "",
        "Tokenizer and chat template are the aligned model's. `calibration.json` holds the",
        "confidence method, calibrator and escalation thresholds used by `calibserve serve`.",
        "",
    ]
    return "\n".join(lines)

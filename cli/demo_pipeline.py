"""The demo's offline steps after its world is built: the base/aligned merge, the served model
(the merge plus free-form calibrators fitted through the real serving path) and the expert's
calibration, each built once per world and cached next to it.

Used by `calibserve demo`, the tests and the benchmarks. This composes `merge` with the demo
world's layout (`base/`, `aligned/`, `expert/`, `data/`), so it lives in the console-script
package: `merge` knows nothing of the demo, and `demo` imports nothing of ours but
`calibserve.publish`. The world directory itself is a verified cache and stays as built; what is
derived from it goes beside it, keyed by a hash of the files it was derived from.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from calibserve.calibration import CURRENT_VERSION, CalibrationDocument
from calibserve.calibration.mc_prompt import format_mc_prompt
from calibserve.calibration.methods import NO_LETTER
from calibserve.fit.document import with_free_form
from calibserve.fit.free_form import fit_free_form
from calibserve.fit.methods import FREE_FORM_FIT_METHODS
from calibserve.fit.multiple_choice import calibrate_checkpoint
from calibserve.fit.no_letter import fit_no_letter, mc_splits
from calibserve.fit.passes import serve_passes
from calibserve.merge.config import MergeConfig
from calibserve.merge.evaluate import load_short_answers
from calibserve.merge.pipeline import run_merge
from calibserve.merge.sweep import file_identity, fingerprint
from calibserve.publish import build_once, publish_dir, staging

__all__ = [
    "DEMO_FREE_FORM_SETTINGS",
    "DEMO_MERGE_SETTINGS",
    "calibrate_demo_expert",
    "merge_demo",
    "served_demo_model",
]

# The merge options `calibserve demo` uses (part of the cache key: change one, merge again).
DEMO_MERGE_SETTINGS: dict[str, Any] = {
    "grid": "0:1:0.1",
    "method": "linear",
    "refine": False,
    "select": "max-accuracy",
    "calibrator": "temperature",
}


def merge_demo(demo_dir: Path, progress: bool = False) -> Path:
    """The demo base/aligned merge, built once per demo world and cached next to it.

    Returns the merge's OUT directory (`merged-<world>-<key>/`, the model is its `model/`).
    """
    demo_dir = Path(demo_dir).resolve()
    inputs = [
        *sorted((demo_dir / "base").glob("*.safetensors")),
        *sorted((demo_dir / "aligned").glob("*.safetensors")),
        *sorted((demo_dir / "data").glob("*.jsonl")),
    ]
    ident = json.dumps(
        {
            "settings": DEMO_MERGE_SETTINGS,
            "files": file_identity(inputs),
            "eval_version": fingerprint({}),
            # A cache shared with older code never hands it a document version it cannot read.
            "calibration_version": CURRENT_VERSION,
            # What the merge writes beside the model: probes.jsonl (the held-out probe split)
            # and the fit's confidence quantiles (the drift reference) arrived together.
            "model_files": ["calibration.json", "probes.jsonl", "confidence_quantiles"],
        },
        sort_keys=True,
    )
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]

    def merge(out: Path) -> None:  # run_merge stages in `.OUT.partial` and renames it to OUT
        config = MergeConfig(
            base=str(demo_dir / "base"),
            aligned=str(demo_dir / "aligned"),
            data=demo_dir / "data",
            out=out,
            overwrite=True,
            **DEMO_MERGE_SETTINGS,
        )
        run_merge(config, progress=progress)

    out = demo_dir.parent / f"merged-{demo_dir.name}-{key}"
    return build_once(out, lambda o: (o / "model" / "calibration.json").is_file(), merge)


def calibrate_demo_expert(demo_dir: Path) -> Path:
    """The demo expert's calibration.json, fitted once per demo world and cached next to it."""
    demo_dir = Path(demo_dir).resolve()
    inputs = [
        *sorted((demo_dir / "expert").glob("*.safetensors")),
        demo_dir / "data" / "calibrate.jsonl",
        demo_dir / "data" / "test.jsonl",
    ]
    ident = {"files": file_identity(inputs), "calibration_version": CURRENT_VERSION,
             "calibrator": "auto"}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    out = demo_dir.parent / f"expert-calibration-{demo_dir.name}-{key}.json"
    # calibrate_checkpoint writes its file atomically: a killed fit leaves no file behind.
    return build_once(
        out, Path.is_file, lambda o: calibrate_checkpoint(demo_dir / "expert", demo_dir / "data", o)
    )


# How the served demo model's free-form methods are fitted (part of the cache key). Platt, not
# `auto`: auto keeps the identity when the raw confidence is already within one standard error
# of the best held-out ECE, and the fit serves an identity as `calibrated: false`; the demo
# is meant to show a calibrated free-form confidence (its held-out numbers are in the document).
DEMO_FREE_FORM_SETTINGS: dict[str, Any] = {"calibrator": "platt", "max_tokens": 16,
                                           "temperature": 0.0}


def served_demo_model(
    demo_dir: Path,
    merged: Path | None = None,
    *,
    upstream: str | None = None,
    upstream_model: str | None = None,
) -> Path:
    """The model `calibserve demo` serves: the merge's `model/`, its calibration.json extended
    with the free-form methods fitted through the real serving path (a vLLM engine on the merged
    checkpoint, calibserve's own app, each question of `data/short_calibrate.jsonl` as a plain
    user message; `short_test.jsonl` is reported per method in `metrics.short_answer.test`),
    and `no_letter` on the multiple-choice items asked in the same pass (the merged model
    answers them with a letter, so it is usually left without a map, with a note).

    Built once per merge and cached beside the world (`served-<world>-<key>/`, a copy of the
    merged checkpoint: the merge's own output stays as it was written). Returns the model
    directory. By default calibserve starts its own managed engine for the fit; `upstream` (a
    vLLM already serving the merged checkpoint as `upstream_model`) saves that start.
    """
    demo_dir = Path(demo_dir).resolve()
    model = (Path(merged) if merged is not None else merge_demo(demo_dir)) / "model"
    data = demo_dir / "data"
    cal_file, test_file = data / "short_calibrate.jsonl", data / "short_test.jsonl"
    ident = {
        "files": file_identity([*sorted(model.glob("*.safetensors")), model / "calibration.json",
                                cal_file, test_file]),
        "settings": DEMO_FREE_FORM_SETTINGS,
        "methods": [*FREE_FORM_FIT_METHODS, NO_LETTER],
        "mc": file_identity([p for p in (data / "calibrate.jsonl", data / "test.jsonl")
                             if p.is_file()]),
        "calibration_version": CURRENT_VERSION,
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]

    def fit(out: Path) -> None:
        cal, test = load_short_answers(cal_file), load_short_answers(test_file)
        mc_cal, mc_test = mc_splits(data)
        (served,) = serve_passes(
            [str(it["question"]) for it in [*cal, *test]], [model / "calibration.json"],
            model_dir=None if upstream is not None else model, upstream=upstream,
            upstream_model=upstream_model,
            max_tokens=DEMO_FREE_FORM_SETTINGS["max_tokens"],
            temperature=DEMO_FREE_FORM_SETTINGS["temperature"],
            mc_questions=[format_mc_prompt(it) for it in [*mc_cal, *mc_test]],
        )
        replies, n_short = served.replies, len(cal) + len(test)
        doc = CalibrationDocument.load(model)
        kind = DEMO_FREE_FORM_SETTINGS["calibrator"]
        result = fit_free_form((cal, replies[: len(cal)]), (test, replies[len(cal):n_short]),
                               kind=kind, q=doc.quantile())
        mc_replies = replies[n_short:]
        result.no_letter = fit_no_letter((mc_cal, mc_replies[: len(mc_cal)]),
                                         (mc_test, mc_replies[len(mc_cal):]), kind=kind)
        with staging(out) as tmp:
            shutil.copytree(model, tmp, dirs_exist_ok=True)
            with_free_form(doc, result).write(tmp / "calibration.json")
            publish_dir(tmp, out)

    out = demo_dir.parent / f"served-{demo_dir.name}-{key}"
    return build_once(out, _has_free_form, fit)


def _has_free_form(model_dir: Path) -> bool:
    """A served demo model is complete once its calibration.json names the free-form fit."""
    try:
        doc = CalibrationDocument.load(model_dir)
    except (OSError, ValueError):
        return False
    return "short_answer" in doc.to_dict().get("metrics", {})

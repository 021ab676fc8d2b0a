"""The demo's offline steps after its world is built: the base/aligned merge and the expert's
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
from pathlib import Path
from typing import Any

from calibserve.calibration import CURRENT_VERSION
from calibserve.merge.calibrate_checkpoint import calibrate_checkpoint
from calibserve.merge.config import MergeConfig
from calibserve.merge.pipeline import run_merge
from calibserve.merge.sweep import file_identity, fingerprint
from calibserve.publish import build_once

__all__ = ["DEMO_MERGE_SETTINGS", "calibrate_demo_expert", "merge_demo"]

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

"""benchmarks/freeform/fit_splits.py: each fit split's map, judged on the test split."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.freeform.fit_splits import judge
from calibserve.calibration import ece
from calibserve.calibration.calibrators import PlattScaling


def split(rng: np.random.Generator, n: int, shift: float) -> dict[str, np.ndarray]:
    conf = rng.random(n)
    return {"confidence": conf, "correct": rng.random(n) < np.clip(conf - shift, 0, 1)}


def test_each_fit_is_judged_on_the_test_split_and_a_harder_fit_split_shows() -> None:
    rng = np.random.default_rng(0)
    scores = {"calibrate": split(rng, 4000, 0.2), "select": split(rng, 4000, 0.0),
              "test": split(rng, 4000, 0.0)}
    out = judge("platt", scores)
    assert set(out) == {"calibrate", "select", "calibrate + select"}
    test = scores["test"]
    by_hand = PlattScaling().fit(scores["select"]["confidence"], scores["select"]["correct"])
    assert out["select"]["ece"] == pytest.approx(
        ece(np.asarray(by_hand.apply(test["confidence"])), test["correct"]))
    assert out["calibrate + select"]["n_fit"] == 8000
    # A fit split harder than the test split serves it under-confident, by about the gap.
    gap = out["calibrate"]["test_accuracy"] - out["calibrate"]["mean_confidence"]
    assert 0.1 < gap < 0.3 and abs(out["select"]["test_accuracy"]
                                   - out["select"]["mean_confidence"]) < 0.03
    assert out["calibrate"]["ece"] > out["select"]["ece"]

"""`calibserve certify`: a route's thresholds certified tier by tier (merge/certify_route.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from calibserve.calibration import CalibrationDocument
from calibserve.calibration.guarantee import certify_threshold
from calibserve.fit.multiple_choice import calibrate_checkpoint
from calibserve.merge.certify_route import RouteTier, _served_confidence
from calibserve.merge.evaluate import load_mc_items

runner = CliRunner()


@pytest.mark.slow
def test_a_two_tier_route_is_certified_tier_by_tier(demo_dir: Path, tmp_path: Path) -> None:
    from calibserve.cli import app

    data = demo_dir / "data"
    files = {}
    for name in ("aligned", "expert"):
        files[name] = tmp_path / f"{name}.json"
        calibrate_checkpoint(demo_dir / name, data, files[name], "platt")
    before = {k: f.read_bytes() for k, f in files.items()}
    args = ["certify", "--tier", str(demo_dir / "aligned"), "--tier", str(demo_dir / "expert"),
            "--calibration", str(files["aligned"]), "--calibration", str(files["expert"]),
            "--data", str(data)]
    refused = runner.invoke(app, [*args, "--max-error", "0.02"])
    assert refused.exit_code == 2, refused.output
    assert "Invalid value for '--max-error'" in refused.output
    assert "must escalate at least" in refused.output and "Traceback" not in refused.output
    assert {k: f.read_bytes() for k, f in files.items()} == before  # nothing written

    ok = runner.invoke(app, [*args, "--max-error", "0.3", "--delta", "0.2"])
    assert ok.exit_code == 0, ok.output
    assert "tier 0 (aligned)" in ok.output and "tier 1 (expert)" in ok.output
    # The same numbers by hand: the primary on every item at delta / 2, the expert on the
    # items the primary did not keep.
    items = load_mc_items(data / "calibrate.jsonl")
    tiers = [RouteTier(demo_dir / n, files[n]) for n in ("aligned", "expert")]
    (c1, y1), (c2, y2) = (_served_confidence(t, items) for t in tiers)
    first = certify_threshold(c1, y1, 0.3, 0.1)
    primary = CalibrationDocument.load(files["aligned"]).method("answer").guarantee_for(0.3)
    assert primary is not None and primary.threshold == first.threshold
    assert (primary.tier, primary.tiers, primary.after, primary.delta) == (0, 2, None, 0.1)
    left = ~(c1 >= first.threshold)
    second = certify_threshold(c2[left], y2[left], 0.3, 0.1)
    expert = CalibrationDocument.load(files["expert"]).method("answer").guarantee_for(0.3)
    if second.certified:
        assert expert is not None and expert.threshold == second.threshold
        assert (expert.tier, expert.after, expert.n) == (1, ["aligned"], int(left.sum()))
    else:
        assert expert is None and "nothing certified" in ok.output
        # The last tier is never judged: its answers fall outside the guarantee, the route
        # still serves (a middle tier in its place would make the route unservable).
        assert "served outside the guarantee" in ok.output
    assert np.isfinite(first.threshold)


def test_certify_refuses_a_bad_batch_naming_it(tiny_world: dict[str, Path],
                                               tmp_path: Path) -> None:
    from calibserve.cli import app

    cal = tmp_path / "calibration.json"
    cal.write_text("{}")
    before = cal.read_bytes()
    result = runner.invoke(app, ["certify", "--tier", str(tiny_world["aligned"]),
                                 "--calibration", str(cal), "--data", str(tiny_world["data"]),
                                 "--max-error", "0.2", "--batch", "0"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--batch'" in result.output and "Traceback" not in result.output
    assert cal.read_bytes() == before
